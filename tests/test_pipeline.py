"""cbp_kernels.pipeline (the job behind cbp-quantize) as a user meets it: a run lives in its own
directory (resume / report / eval from anywhere), run directories are unique, bad data, files
and options give one line before anything is written, resume refuses another thread count or
world size, progress without carriage returns, metrics at each epoch's end, per-layer results,
plots that say what they show."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cbp_kernels.cli import main
from cbp_kernels.pipeline import RunError, read_run, run
from cbp_kernels.pipeline.config import create_run_dir
from conftest import HANG_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny npz job: 48 / 16 samples of [T=3, C=2, 6, 6] frames, one CBP epoch.
TINY = ["--data", "npz", "--levels", "binary", "--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "16"]


def _frames(path, n: int, channels: int = 2, nan: bool = False) -> None:
    rng = np.random.RandomState(n)
    labels = np.arange(n) % 3
    frames = (rng.rand(n, 3, channels, 6, 6) < 0.2 + 0.15 * labels[:, None, None, None, None]).astype(np.float32)
    if nan:
        frames[n // 2, 1, 0, 2, 3] = np.nan
    np.savez(path, frames=frames, labels=labels)


def _data_dir(root, **kw):
    root.mkdir(parents=True, exist_ok=True)
    _frames(root / "train.npz", 48, **kw)
    _frames(root / "test.npz", 16, **kw)
    return root


def _fails(capsys, *argv, match: str, code: int = 2) -> str:
    """``main(argv)`` exits with ``code`` and ONE line on stderr that contains ``match``."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny run started from another working directory with a relative --data-path."""
    base = tmp_path_factory.mktemp("pipeline")
    _data_dir(base / "data")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(["run", *TINY, "--data-path", "data", "--out", "first", "--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    return base / "first"


def _unfinish(run_dir) -> None:
    """Makes a finished run look killed after its last checkpoint (the stage not marked done)."""
    for name in ("summary.json", "table.txt", "binary/result.json", "binary/model.safetensors"):
        (run_dir / name).unlink()


# --- 1: a run lives in its directory -----------------------------------------------------------


def test_resume_writes_into_its_directory_from_anywhere(tiny_run, tmp_path, monkeypatch, capsys):
    config = json.loads((tiny_run / "config.json").read_text())
    assert "out" not in config and os.path.isabs(config["data_path"])  # nothing relative to a cwd
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    _unfinish(copy)
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", str(copy)]) == 0
    assert "now: binary, 1 of 1 epochs done" in capsys.readouterr().out  # the unfinished stage's progress
    assert main(["run", "--resume", os.path.relpath(copy), "--quiet"]) == 0
    assert (copy / "summary.json").exists() and (copy / "binary" / "model.safetensors").exists()
    assert {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")} == before  # the original untouched
    assert os.listdir(elsewhere) == []  # no runs/ here, no pre-training again
    rows = json.loads((copy / "summary.json").read_text())["rows"]
    original = json.loads((tiny_run / "summary.json").read_text())["rows"]
    for mine, theirs in zip(rows, original):  # the same results (seconds differ: nothing was trained now)
        assert {k: v for k, v in mine.items() if k not in ("seconds_per_epoch", "export")} == \
            {k: v for k, v in theirs.items() if k not in ("seconds_per_epoch", "export")}
    assert rows[1]["export"] == str(copy / "binary" / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(copy / "binary" / "model.safetensors")]) == 0  # the data path as recorded
    assert f"accuracy {rows[1]['packed_accuracy']:.2f}%" in capsys.readouterr().out


# --- 2: unique run directories ----------------------------------------------------------------


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    now = datetime.datetime(2026, 1, 1, 12, 0, 0)
    first = create_run_dir(None, root=str(tmp_path / "runs"), now=now)
    second = create_run_dir(None, root=str(tmp_path / "runs"), now=now)
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    out = str(tmp_path / "mine")
    create_run_dir(out)
    with pytest.raises(RunError, match="holds a run already"):  # the second claim of one --out
        create_run_dir(out)
    from cbp_kernels.pipeline.job import _claim

    assert isinstance(_claim(out), RunError)  # rank 0's failed claim, sent to every rank to raise


# --- 3: data checked at load ------------------------------------------------------------------


def test_nan_data_is_refused_before_anything_is_written(tmp_path, capsys):
    data = _data_dir(tmp_path / "data", nan=True)
    _fails(capsys, "run", *TINY, "--data-path", str(data), "--out", str(tmp_path / "o"), match="NaN/Inf")
    assert not (tmp_path / "o").exists()


def test_streamed_data_is_checked_sample_by_sample():
    from cbp_kernels.pipeline.stages import _check_finite

    class Streamed(torch.utils.data.Dataset):
        num_classes, timesteps = 2, 1

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float("nan") if i == 2 else 1.0), 0

    checked = _check_finite(Streamed(), "mine", "train")
    assert checked.num_classes == 2 and len(checked) == 3 and checked[1][1] == 0
    with pytest.raises(RunError, match="sample 2 holds NaN"):
        checked[2]


def test_one_npz_file_for_both_splits_is_said(tmp_path, capsys):
    _frames(tmp_path / "all.npz", 32)
    result = run(data="npz", data_path=str(tmp_path / "all.npz"), levels="binary", pretrain_epochs=0, epochs=0,
                 batch_size=16, out=str(tmp_path / "o"), progress=False)
    assert "is both the train and the test set" in capsys.readouterr().out and result.status == 0


# --- 4: thread count and world size -----------------------------------------------------------


def test_resume_refuses_another_thread_count_unless_allowed(tiny_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    _unfinish(copy)
    config = json.loads((copy / "config.json").read_text())
    assert config["threads"] == torch.get_num_threads() and config["world_size"] == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        _fails(capsys, "run", "--resume", str(copy), match=f"OMP_NUM_THREADS={threads}")
        assert not (copy / "summary.json").exists()
        assert main(["run", "--resume", str(copy), "--allow-env-change", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    changes = json.loads((copy / "config.json").read_text())["environment_changes"]
    assert [(c["from"]["threads"], c["to"]["threads"]) for c in changes] == [(threads, threads + 1)]


def test_our_kernels_do_not_depend_on_the_thread_count():
    """The neuron, constraint pass, multiplier step and popcount conv give the same bits with
    1, 2 and 3 threads (fixed chunks summed in order; no per-thread partial sums)."""
    from cbp_kernels.ops import (constraint_pass, multiplier_step, multistep_neuron, pack_spikes, pack_weight,
                                 packed_conv2d)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3000, generator=gen, requires_grad=True)
    weights = [torch.randn(70_000, generator=gen) * 0.1, torch.randn(5000, generator=gen) * 0.1]
    lambdas = [torch.rand(w.shape, generator=gen) for w in weights]
    levels, scales = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.08, 0.1])
    spikes = (torch.rand(2, 6, 6, 40, generator=gen) < 0.3).float()
    wq = torch.randint(-1, 2, (8, 40, 3, 3), generator=gen).float()

    def everything():
        s, _ = multistep_neuron(x, neuron="lif", tau=2.0, backend="cpu")
        (grad,) = torch.autograd.grad(s.sum(), x)
        grads = [torch.zeros_like(w) for w in weights]
        sums = constraint_pass(weights, lambdas, levels, scales, 2.0, grads=grads, backend="cpu")
        lams, m, v = [lam.clone() for lam in lambdas], [torch.zeros_like(w) for w in weights], [
            torch.zeros_like(w) for w in weights]
        multiplier_step(weights, lams, m, v, levels, scales, 2.0, step=1, lr=0.01, backend="cpu")
        conv = packed_conv2d(pack_spikes(spikes), pack_weight(wq * 0.5, "ternary", 0.5), None, 1, 1, backend="cpu")
        return [s, grad, *sums, *grads, *lams, *m, *v, conv]

    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(everything())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# --- 5: one line, before a run directory ------------------------------------------------------


@pytest.mark.parametrize("argv, match", [
    (["--device", "tpu"], "--device tpu"),
    (["--pretrain-lr", "nan"], "--pretrain-lr"),
    (["--model", "sew_resnet18"], "--model sew_resnet18 does not take the data's samples [1, 8, 8]"),
    (["--levels", "nan"], "nan is not finite"),
    (["--levels=binary,1,inf"], "inf is not finite"),
    (["--epochs", "-1"], "--epochs must be an integer >= 0"),
    (["--method", "cq", "--levels", "ternary"], "--method cq converts to 8-bit"),
])
def test_bad_options_are_one_line_before_a_run_directory(argv, match, tmp_path, capsys):
    _fails(capsys, "run", *argv, "--out", str(tmp_path / "o"), match=match)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damaged", ["config.json", "pretrained.pt", "binary/last.pt"])
@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_damaged_run_files_are_one_line(tiny_run, tmp_path, capsys, damaged, how):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    _unfinish(copy)
    path = copy / damaged
    data = path.read_bytes()
    path.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    _fails(capsys, "run", "--resume", str(copy), match=str(path))
    if damaged == "config.json":
        _fails(capsys, "report", str(copy), match=str(path))
    elif damaged == "binary/last.pt":
        _fails(capsys, "report", str(copy), match=str(path))  # its progress is read from it


def test_eval_on_data_of_another_channel_count(tiny_run, tmp_path, capsys):
    other = _data_dir(tmp_path / "three", channels=3)
    _fails(capsys, "eval", str(tiny_run / "binary" / "model.safetensors"), "--data", "npz", "--data-path",
           str(other), match="does not take the data's samples [3, 3, 6, 6]")


# --- 8: what a run says and records -----------------------------------------------------------


def test_quiet_prints_only_the_table(tiny_run, tmp_path, capsys):
    assert main(["run", *TINY, "--data-path", json.loads((tiny_run / "config.json").read_text())["data_path"],
                 "--out", str(tmp_path / "q"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == (tmp_path / "q" / "table.txt").read_text() and captured.err == ""


def test_progress_metrics_and_per_layer_results(tiny_run, tmp_path, capsys):
    """Without a terminal: no carriage-return bars, one line per epoch; metrics.jsonl holds
    each epoch (with its time) when the epoch's line is said; config.json names the device;
    the rows carry per-layer results and ``report`` prints them."""
    out = tmp_path / "r"
    seen = []

    def say(line: str) -> None:
        if line.startswith("binary: epoch="):
            records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
            seen.append([(r["stage"], r["epoch"], bool(r["time"])) for r in records])
        print(line)

    data_path = json.loads((tiny_run / "config.json").read_text())["data_path"]
    result = run(data="npz", data_path=data_path, levels="binary", pretrain_epochs=1, epochs=2, batch_size=16,
                 out=str(out), say=say)
    assert seen == [[("binary", 0, True)], [("binary", 0, True), ("binary", 1, True)]]
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out
    assert json.loads((out / "config.json").read_text())["resolved_device"] == "cpu"
    layers = result.rows[1]["layers"]
    assert list(layers) == result.rows[1]["quantized_layers"] == ["conv2", "fc1"]
    from safetensors.torch import load_file

    tensors = load_file(str(out / "binary" / "model.safetensors"))
    for name, r in layers.items():
        assert r["scale"] == pytest.approx(float(tensors[f"{name}.scale"]))
        assert 0 < r["moved_fraction"] <= 1 and r["mean_shift"] > 0 and r["cfs"] >= 0
    assert {name: r["weights"] for name, r in layers.items()} == {"conv2": 32 * 16 * 9, "fc1": 128 * 32 * 9}
    total = sum(r["weights"] for r in layers.values())
    assert sum(r["cfs"] * r["weights"] for r in layers.values()) / total == pytest.approx(result.rows[1]["cfs_trained"])
    assert read_run(str(out)).rows[1]["layers"] == layers
    assert main(["report", str(out)]) == 0
    assert "per layer" in capsys.readouterr().out


# --- 9: plots ---------------------------------------------------------------------------------


def test_plots_say_what_they_show(monkeypatch, tmp_path):
    from cbp_kernels.quant import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    history = [{"epoch": e, "accuracy": 97.5 + 1.4 * e / 11, "cfs": 0.05 / (e + 1), "g": 1 + e // 3}
               for e in range(12)]
    plots.plot_history(history, tmp_path / "h.png", title="run-1: CBP ternary")
    plots.plot_comparison(["FP32", "CBP"], [97.5, 98.9], [2e6, 1e5], tmp_path / "c.png", title="run-1")
    history_fig, compare_fig = figures
    assert history_fig._suptitle.get_text() == "run-1: CBP ternary"
    top, bottom = history_fig.axes[:2]
    assert top.get_legend() is not None and bottom.get_legend() is not None
    assert bottom.get_yscale() == "linear"  # g
    ticks = [t for t in bottom.get_xticks() if 1 <= t <= 12]
    assert ticks and all(float(t).is_integer() for t in ticks)
    for axis in (top, compare_fig.axes[0]):  # 97.5 vs 98.9: at least a third of the axis apart
        lo, hi = axis.get_ylim()
        assert hi - lo < 3 * 1.4, (lo, hi)


# --- processes under torchrun ------------------------------------------------------------------

def test_a_job_destroys_the_process_group_it_created_at_exit(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) the first job joins the group and registers its
    destruction for the interpreter's exit (a gloo group left to torch's own teardown can abort
    the process); a later job reuses the group. The collective calls are stand-ins here: two
    real ranks run in tests/test_cli.py."""
    import atexit

    import torch.distributed as dist

    from cbp_kernels.pipeline.stages import _setup_dist

    calls, registered, state = [], [], {"up": False}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend) or state.update(up=True))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(atexit, "register", registered.append)
    first, second = _setup_dist("cpu"), _setup_dist("cpu")
    assert calls == ["gloo"] and registered == [dist.destroy_process_group]  # once, for the first job
    assert (first.rank, first.world, second.rank) == (1, 2, 1) and not first.main


def test_the_command_under_torchrun_flushes_its_output_and_exits_with_its_status(tiny_run):
    """`python -m cbp_kernels` in a torchrun rank ends with os._exit (cli.entry): what it printed
    must still reach the pipe, and the status the process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe: block-buffered output
    env.update(PYTHONPATH=ROOT, WORLD_SIZE="2")
    done = subprocess.run([sys.executable, "-m", "cbp_kernels", "report", str(tiny_run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished" in done.stdout and "Precision" in done.stdout, done.stdout


@pytest.mark.parametrize("flag", [False, True])
def test_float_forward_switch_reaches_the_quantized_layers(flag):
    """``--float-forward`` (RUN_DEFAULTS' float_forward) turns CBPConfig.integer_forward off: the
    run's CBP quantizer then switches the exact integer forward off on every quantized layer
    (by default each takes it where it is the faster forward)."""
    from cbp_kernels.cli import build_parser
    from cbp_kernels.models import DigitsNet
    from cbp_kernels.pipeline.config import RUN_DEFAULTS, resolve_config
    from cbp_kernels.pipeline.stages import _quantizer

    args = build_parser().parse_args(["run", *(["--float-forward"] if flag else [])])
    cfg = resolve_config({k: v for k, v in vars(args).items() if k in RUN_DEFAULTS})
    assert cfg["cbp"]["integer_forward"] is not flag
    quantizer = _quantizer("cbp", "binary", DigitsNet(), cfg)
    assert quantizer.layers and all(m.integer_forward is (not flag) for m in quantizer.layers.values())


_DENORMAL_JOB = """
import json, sys, torch
torch.set_num_threads(2)
if sys.argv[1] == "late":  # a parallel convolution starts torch's worker threads before the job
    torch.nn.functional.conv2d(torch.rand(8, 8, 64, 64), torch.rand(8, 8, 3, 3))
from cbp_kernels.cli import main
status = main(["run", *sys.argv[3:], "--flush-denormal", "--out", sys.argv[2], "--quiet"])
tiny = torch.full((8, 8, 64, 64), 1e-21)  # products 1e-42: denormal float32
print(json.dumps({"status": status, "denormals": int(torch.nn.functional.conv2d(tiny, tiny[:8, :, :3, :3])
                                                       .count_nonzero())}))
"""


@pytest.mark.parametrize("when", ["first", "late"])
def test_flush_denormal_holds_on_every_thread_or_is_refused(when, tmp_path):
    """``--flush-denormal`` (README "Denormals in CPU training"): set at the job's start, every
    intra-op thread computes denormal products as 0 for the whole run, and config.json keeps it
    for --resume; after torch's worker threads have started (here: a 2-thread convolution
    before the job, from Python) it cannot reach them: one line, nothing written."""
    _data_dir(tmp_path / "data")
    out = tmp_path / "run"
    tiny = ["--data", "npz", "--data-path", str(tmp_path / "data"), "--levels", "binary", "--pretrain-epochs", "0",
            "--epochs", "0"]
    done = subprocess.run([sys.executable, "-c", _DENORMAL_JOB, when, str(out), *tiny], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    if when == "first":
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == {"status": 0, "denormals": 0}
        assert json.loads((out / "config.json").read_text())["flush_denormal"] is True
    else:
        assert done.returncode == 2 and not out.exists()
        err = done.stderr.strip()
        assert err.count("\n") == 0 and "--flush-denormal: torch's worker threads started before it" in err, err


def test_flush_denormal_is_a_switch():
    from cbp_kernels.pipeline.config import RUN_DEFAULTS, resolve_config

    with pytest.raises(RunError, match="--flush-denormal is a switch"):
        resolve_config({**RUN_DEFAULTS, "flush_denormal": "yes"})
