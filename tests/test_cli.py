"""cbp-quantize end to end on the embedded digits default (few epochs), its export, resume
after SIGKILL, torchrun with 2 CPU processes, the peer methods (--method sigmoid / cq) and
`compare`, and every bad argument / bad data path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cbp_kernels import load_packed
from cbp_kernels.cli import format_memory, main, parse_levels
from cbp_kernels.data import get_dataset, time_major
from cbp_kernels.export import build_architecture, read_metadata, save_packed
from cbp_kernels.nn import PackedConv2d, PackedLinear
from cbp_kernels.ops import PackedWeight, unpack_weight
from cbp_kernels.pipeline import RunError
from conftest import HANG_GUARD_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short enough for a test, long enough to train: FP32 1 epoch (~75 %), CBP 2 epochs per level set.
QUICK = ["--pretrain-epochs", "1", "--epochs", "2"]


def _cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "cbp_kernels", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _fails(capsys, *argv, match: str, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["run", *QUICK, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_default_run_table_and_files(default_run, capsys):
    summary = json.loads((default_run / "summary.json").read_text())
    rows = {r["precision"]: r for r in summary["rows"]}
    assert list(rows) == ["FP32", "binary", "ternary"]
    assert rows["FP32"]["accuracy"] > 30  # chance is 10 %
    for name in ("binary", "ternary"):
        r = rows[name]
        assert r["accuracy"] > 30 and r["cfs"] == 0 and r["cfs_trained"] > 0 and 0 < r["forced_fraction"] <= 1
        # the table shows what training reached and what forcing moved, not the CFS 0 after it
        cells = _table_row((default_run / "table.txt").read_text(), name.capitalize())
        assert cells[-2:] == [f"{r['cfs_trained']:.3g}", f"{100 * r['forced_fraction']:.1f}%"]
        assert r["same_predictions"] and r["packed_accuracy"] == r["accuracy"]
        assert r["weight_bits"] < rows["FP32"]["weight_bits"] / 10
        for f in ("last.pt", "model.safetensors", "accuracy_cfs_g.png", "weight_histograms.png", "result.json"):
            assert (default_run / name / f).stat().st_size > 0, f
    # paper's weight memory: conv2 (4608) + fc1 (65536) at 1 / 2 bits, conv1 (144) + fc2 (1280) at FP32
    assert rows["binary"]["weight_bits"] == 70144 + 32 * 1424
    assert rows["ternary"]["weight_bits"] == 2 * 70144 + 32 * 1424
    config = json.loads((default_run / "config.json").read_text())
    assert config["data"] == "digits" and config["epochs"] == 2 and config["cbp"]["epochs"] == 2
    records = [json.loads(line) for line in (default_run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("binary", 0), ("binary", 1), ("ternary", 0), ("ternary", 1)]
    assert all("accuracy" in r and "cfs" in r and "g" in r for r in records)
    assert "Binary" in (default_run / "table.txt").read_text()
    assert main(["report", str(default_run)]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "Ternary" in out and "model.safetensors" in out


@pytest.mark.slow
@pytest.mark.parametrize("levels", ["binary", "ternary"])
def test_export_round_trip(default_run, capsys, levels):
    path = default_run / levels / "model.safetensors"
    packed = load_packed(path)
    assert isinstance(packed.conv2, PackedConv2d) and isinstance(packed.fc1, PackedLinear)
    assert not isinstance(packed.conv1, (PackedConv2d, PackedLinear))
    meta = read_metadata(path)
    assert meta["levels"] == levels and meta["packed"]["conv2"]["levels"] == levels
    # The same weights as float layers: the float quantized model of the run.
    tensors = load_file(str(path))
    float_model = build_architecture(meta["arch"])
    state = {k: v for k, v in tensors.items() if not k.endswith((".planes", ".scale"))}
    for name, info in meta["packed"].items():
        pw = PackedWeight(tensors[f"{name}.planes"], float(tensors[f"{name}.scale"]), tuple(info["shape"]), levels)
        state[f"{name}.weight"] = unpack_weight(pw)
    float_model.load_state_dict(state)
    test = get_dataset("digits", split="test")
    with torch.no_grad():
        x = time_major(test.images, 4)
        float_preds, packed_preds = float_model(x).argmax(1), packed(x).argmax(1)
    assert torch.equal(float_preds, packed_preds)
    result = json.loads((default_run / levels / "result.json").read_text())
    accuracy = 100.0 * float((packed_preds == test.labels).float().mean())
    assert accuracy == pytest.approx(result["packed_accuracy"])
    assert main(["eval", str(path)]) == 0
    assert f"accuracy {result['packed_accuracy']:.2f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(default_run, tmp_path, capsys):
    """A run killed during its second CBP epoch, resumed, ends bit-identical to the
    uninterrupted run (its binary stage is independent of the ternary one)."""
    out = tmp_path / "killed"
    proc = _cli("run", *QUICK, "--levels", "binary", "--out", str(out))
    checkpoint = out / "binary" / "last.pt"
    while not checkpoint.exists() and proc.poll() is None:  # the child's progress, not the clock
        time.sleep(0.05)
    assert checkpoint.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "binary" / "result.json").exists()  # it was killed mid-stage
    assert main(["report", str(out)]) == 0
    assert "unfinished (0 of 1 stages done; continue with --resume)" in capsys.readouterr().out
    resumed = _cli("run", "--resume", str(out))
    _, err = resumed.communicate(timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, err[-2000:]
    mine = torch.load(checkpoint, weights_only=True)
    ref = torch.load(default_run / "binary" / "last.pt", weights_only=True)
    for key, value in ref["model"].items():
        assert torch.equal(mine["model"][key], value), key
    assert all(torch.equal(a, b) for a, b in zip(mine["lambdas"], ref["lambdas"]))
    assert mine["schedule"] == ref["schedule"] and mine["epoch"] == ref["epoch"] == 2
    a = load_file(str(out / "binary" / "model.safetensors"))
    b = load_file(str(default_run / "binary" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # no epoch recorded twice


# Each torchrun rank runs `run` through `main` (as from Python), then `eval` as the
# `cbp-quantize` process does (`entry`: it exits the process); eval reuses the process group
# (a second init_process_group in one process hangs) and finds rank 0's export on every rank.
_RANK_SCRIPT = """
import sys
from cbp_kernels.cli import entry, main
out = sys.argv[1]
assert main(["run", "--pretrain-epochs", "2", "--epochs", "1", "--levels", "binary", "--out", out]) == 0
sys.argv[1:] = ["eval", out + "/binary/model.safetensors"]
entry()
"""


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Precision") == 1  # only rank 0 prints the table
    assert proc.stdout.count("packed model, digits test split") == 1  # and eval's line
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    summary = json.loads((out / "summary.json").read_text())
    binary = summary["rows"][1]
    assert binary["same_predictions"] and binary["cfs"] == 0 and binary["accuracy"] > 20
    assert sorted(os.listdir(out / "binary")) == ["accuracy_cfs_g.png", "last.pt", "model.safetensors", "result.json",
                                                  "weight_histograms.png"]  # no second writer's leftovers
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_run_on_npz_frames_with_a_custom_level_set(tmp_path, capsys):
    """Event frames [N, T, C, H, W] (another shape than the digits) through the whole job;
    a level set that does not pack gets its CBP row and an export of level codes that eval runs."""
    rng = np.random.RandomState(0)
    for split, n in (("train", 48), ("test", 16)):
        labels = np.arange(n) % 3
        frames = (rng.rand(n, 3, 2, 6, 6) < 0.2 + 0.3 * labels[:, None, None, None, None] / 2).astype(np.float32)
        np.savez(tmp_path / f"{split}.npz", frames=frames, labels=labels)
    out = tmp_path / "run"
    assert main(["run", "--data", "npz", "--data-path", str(tmp_path), "--levels=binary,-2,-1,0,1",
                 "--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "16", "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["FP32", "binary", "levels-2_-1_0_1"]
    assert rows[1]["same_predictions"] and (out / "binary" / "model.safetensors").exists()
    assert "packed_accuracy" not in rows[2] and (out / "levels-2_-1_0_1" / "model.safetensors").exists()
    # conv2 (4608) + fc1 (36864) weights at 1 / 2 bits (4 levels), conv1 (288) + fc2 (384) at FP32
    assert rows[1]["weight_bits"] == 41472 + 32 * 672 and rows[2]["weight_bits"] == 2 * 41472 + 32 * 672
    assert rows[2]["cfs"] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["timesteps"] == 3
    assert config["arch"]["kwargs"] == {"num_classes": 3, "in_channels": 2, "image_size": 6}
    assert "levels-2_-1_0_1" in capsys.readouterr().out
    assert main(["eval", str(out / "levels-2_-1_0_1" / "model.safetensors")]) == 0
    assert f"accuracy {rows[2]['accuracy']:.2f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_model_given_as_checkpoint_path(default_run, tmp_path, capsys):
    """--model PATH (a training checkpoint naming its architecture): no pre-training, the
    FP32 row is the checkpoint's accuracy; --epochs 0 rounds the weights onto the levels."""
    state = torch.load(default_run / "pretrained.pt", weights_only=True)
    path = tmp_path / "ckpt.pth"
    torch.save({"arch": "digits-net", "model": state, "epoch": 3}, path)
    out = tmp_path / "run"
    assert main(["run", "--model", str(path), "--levels", "ternary", "--epochs", "0", "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    ref = json.loads((default_run / "summary.json").read_text())["rows"]
    assert rows[0]["accuracy"] == ref[0]["accuracy"] and rows[1]["cfs"] == 0 and rows[1]["same_predictions"]
    assert "FP32 pre-train" not in capsys.readouterr().err
    torch.save({"model": state}, path)
    _fails(capsys, "run", "--model", str(path), match="does not name its architecture")
    _fails(capsys, "run", "--checkpoint", str(path / "nope.pth"), "--out", str(tmp_path / "o"), match="nope.pth")
    state.pop("fc2.bias")
    torch.save(state, path)
    _fails(capsys, "run", "--checkpoint", str(path), "--out", str(tmp_path / "o"), match="fc2.bias")


@pytest.mark.slow
def test_amp_bf16_run_end_to_end(default_run, tmp_path):
    """--amp bf16 on the digits default (CPU autocast): trains, packs, predicts as the float model."""
    state = torch.load(default_run / "pretrained.pt", weights_only=True)
    path = tmp_path / "ckpt.pth"
    torch.save({"arch": "digits-net", "model": state}, path)
    out = tmp_path / "run"
    assert main(["run", "--model", str(path), "--levels", "binary", "--epochs", "1", "--amp", "bf16",
                 "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["cbp"]["amp"] == "bf16"
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert rows[1]["accuracy"] > 30 and rows[1]["same_predictions"] and rows[1]["cfs_trained"] > 0


def _table_row(table: str, name: str) -> list[str]:
    """The cells of the row of ``name`` in a whitespace-aligned table."""
    return next(line.split() for line in table.splitlines() if line.startswith(name))


def test_run_method_sigmoid(tmp_path):
    """The sigmoid-sum peer through the same stage as CBP: trained, finalized onto the levels,
    packed with predictions equal to the float model's, exported; no CFS / g anywhere."""
    out = tmp_path / "sigmoid"
    assert main(["run", "--method", "sigmoid", "--levels", "binary", *QUICK, "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    r = rows[1]
    assert (r["method"], r["precision"]) == ("sigmoid", "binary")
    assert r["accuracy"] > 30 and r["same_predictions"] and r["packed_accuracy"] == r["accuracy"]
    assert "cfs" not in r and "g" not in r and r["seconds_per_epoch"] > 0
    assert r["weight_bits"] == 70144 + 32 * 1424  # as CBP binary: conv2 + fc1 at 1 bit, conv1 + fc2 FP32
    assert _table_row((out / "table.txt").read_text(), "Binary")[-1] == "-"  # the CFS cell
    stage = out / "sigmoid-binary"
    for f in ("last.pt", "model.safetensors", "accuracy_temperature.png", "weight_histograms.png"):
        assert (stage / f).stat().st_size > 0, f
    assert read_metadata(stage / "model.safetensors")["method"] == "sigmoid"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["sigmoid-binary"] * 2
    assert records[1]["temperature"] > records[0]["temperature"]


def test_run_method_cq(tmp_path, capsys):
    """CQ: the clamp-and-quantize ANN converted to an IF SNN with 8-bit weights mostly predicts
    as the ANN; every layer counts at 8 bits; no packed model. The SNN reads IF-encoded input
    spikes and answers with spike counts / T as the CQ authors' code, which at T=4 tie often
    (measured: the same prediction on 76-78 % of the test set); test_cq.py checks the
    conversion's exactness where it holds (analog current and potential readout, or T=16)."""
    out = tmp_path / "cq"
    assert main(["run", "--method", "cq", "--pretrain-epochs", "0", "--epochs", "2", "--out", str(out)]) == 0
    r = json.loads((out / "summary.json").read_text())["rows"][1]
    assert r["method"] == "cq" and r["epochs"] == 2 and r["timesteps"] == 4
    assert r["accuracy"] > 30 and r["ann_accuracy"] > 30 and r["agreement"] >= 0.6
    assert r["weight_bits"] == 8 * (144 + 4608 + 65536 + 1280)  # conv1, conv2, fc1, fc2
    assert "same_predictions" not in r and not (out / "cq" / "model.safetensors").exists()
    assert (out / "cq" / "accuracy.png").stat().st_size > 0 and (out / "cq" / "last.pt").exists()
    assert _table_row(capsys.readouterr().out, "8-bit")[1] == f"{r['accuracy']:.2f}"


def test_compare_writes_one_table_and_one_plot(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", "--pretrain-epochs", "1", "--epochs", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp32", "cbp", "sigmoid", "cq"]
    table = (out / "compare.md").read_text()
    assert table.strip() in capsys.readouterr().out
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in table.splitlines() if line.startswith("| ") and "Method" not in line}
    assert list(cells) == ["FP32", "CBP binary", "Sigmoid-sum binary", "CQ 8-bit"]
    for name, r in zip(cells, rows):
        accuracy, memory, seconds, cfs, same = cells[name]
        assert accuracy == f"{r['accuracy']:.2f}" and memory == format_memory(r["weight_bits"])
        assert float(seconds) > 0
        # CBP: the CFS training reached before forcing (forcing makes it 0)
        assert cfs == (f"{r['cfs_trained']:.3g}" if name.startswith("CBP") else "-")
        assert not name.startswith("CBP") or r["cfs_trained"] > 0 == r["cfs"]
        assert same == ("yes" if name in ("CBP binary", "Sigmoid-sum binary") else "-")
    assert rows[1]["weight_bits"] == rows[2]["weight_bits"] < rows[3]["weight_bits"] < rows[0]["weight_bits"]
    assert (out / "compare.png").stat().st_size > 0
    assert main(["report", str(out)]) == 0
    assert "| CQ 8-bit |" in capsys.readouterr().out


def test_bad_method_arguments(capsys, tmp_path):
    out = ["--out", str(tmp_path / "never")]
    _fails(capsys, "run", "--method", "foo", *out, match="invalid choice")
    _fails(capsys, "run", "--method", "cq", "--data", "cifar10", "--data-path", str(tmp_path), *out,
           match="digits-net on digits only")
    _fails(capsys, "compare", "--model", "sew_resnet18", *out, match="digits-net on digits only")
    _fails(capsys, "run", "--method", "sigmoid", "--levels=-2,-1,0,1", *out, match="symmetric")
    _fails(capsys, "compare", "--method", "cbp", *out, match="unrecognized arguments")
    assert not (tmp_path / "never").exists()


def test_parse_levels():
    assert parse_levels("binary,ternary") == [("binary", "binary"), ("ternary", "ternary")]
    assert parse_levels("-2,-1,0,1") == [("levels-2_-1_0_1", [-2.0, -1.0, 0.0, 1.0])]
    # numbers equal to a named set take its name (LevelSet: one set, one label)
    assert parse_levels("-1,1;-2,0,2") == [("binary", [-1.0, 1.0]), ("levels-2_0_2", [-2.0, 0.0, 2.0])]
    with pytest.raises(RunError, match="given twice"):
        parse_levels("binary,-1,1")
    assert parse_levels("ternary,-2,0,2") == [("ternary", "ternary"), ("levels-2_0_2", [-2.0, 0.0, 2.0])]
    assert format_memory(2_290_000) == "2.29Mb" and format_memory(115_712) == "116Kb"


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "digits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--levels", "--preset", "--resume", "--data-path", "--timesteps", "--device", "--seed"):
        assert option in text


def test_bad_arguments(capsys, tmp_path):
    out = ["--out", str(tmp_path / "never")]
    _fails(capsys, "run", "--levels", "binary,quaternary", *out, match="quaternary")
    _fails(capsys, "run", "--levels=-1,1,1", *out, match="duplicate")
    _fails(capsys, "run", "--levels=1,-1", *out, match="sorted")
    _fails(capsys, "run", "--levels", "binary,binary", *out, match="twice")
    _fails(capsys, "run", "--epochs", "-1", *out, match="--epochs")
    _fails(capsys, "run", "--batch-size", "0", *out, match="--batch-size")
    _fails(capsys, "run", "--preset", "nope", *out, match="sew-resnet/imagenet")
    _fails(capsys, "run", "--model", "resnet9000", *out, match="not a library model")
    _fails(capsys, "run", "--data", "cifar10", *out, match="needs --data-path")
    _fails(capsys, "run", "--data-path", str(tmp_path), *out, match="embedded")
    _fails(capsys, "run", "--data", "imagefolder", "--data-path", str(tmp_path / "nowhere"), *out, match="nowhere")
    if not torch.cuda.is_available():
        _fails(capsys, "run", "--device", "cuda", *out, match="CUDA")
    _fails(capsys, "run", "--resume", str(tmp_path / "nothing"), match="no config.json")
    _fails(capsys, "run", "--data", "mnist", match="invalid choice")
    assert not (tmp_path / "never").exists()  # a refused run writes nothing


def test_bad_data_names_the_file(capsys, tmp_path):
    np.savez(tmp_path / "train.npz", frames=np.zeros((4, 3, 1, 8, 8)), labels=np.zeros(4, int))
    np.savez(tmp_path / "test.npz", frames=np.zeros((2, 3, 8, 8)), labels=np.zeros(2, int))
    _fails(capsys, "run", "--data", "npz", "--data-path", str(tmp_path), "--out", str(tmp_path / "o"),
           match="test.npz")
    (tmp_path / "cifar-10-batches-py").mkdir()
    _fails(capsys, "run", "--data", "cifar10", "--data-path", str(tmp_path), "--out", str(tmp_path / "o"),
           match="data_batch_1")


def test_resume_and_out_conflicts(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    _fails(capsys, "run", "--out", str(run), match="--resume")
    _fails(capsys, "run", "--resume", str(run), "--epochs", "3", match="--epochs")


def test_eval_and_report_errors(capsys, tmp_path):
    _fails(capsys, "eval", str(tmp_path / "missing.safetensors"), match="missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    _fails(capsys, "eval", str(bad), match="bad.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    _fails(capsys, "eval", str(tmp_path / "foreign.safetensors"), match="not a cbp_kernels packed model")
    _fails(capsys, "report", str(tmp_path), match="not a run directory")


def test_save_packed_refuses_weights_off_levels(tmp_path):
    from cbp_kernels.models import DigitsNet
    from cbp_kernels.nn import QuantConv2d

    net = DigitsNet()
    net.conv2 = QuantConv2d.from_float(net.conv2, torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="not on scale"):
        save_packed(net, tmp_path / "m.safetensors", layers=["conv2"], arch={"name": "digits-net", "kwargs": {}})
    assert not (tmp_path / "m.safetensors").exists()


def test_cbp_quantized_lifconv_layers_pack_with_their_bn_and_neuron():
    """CBPQuantizer on LIFConv2d layers (the library models' layer), then pack_model: the
    packed layers (popcount conv + BN affine + neuron) spike as the float quantized ones."""
    from cbp_kernels import LIFConv2d
    from cbp_kernels.export import pack_model
    from cbp_kernels.nn.lifconv import PackedLIFConv2d
    from cbp_kernels.quant import CBPQuantizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(LIFConv2d(3, 16, 3, padding=1), LIFConv2d(16, 16, 3, padding=1),
                              LIFConv2d(16, 8, 3, padding=1))
    with torch.no_grad():
        for layer in net:
            layer.bn.running_mean.uniform_(-0.2, 0.2)
            layer.bn.weight.uniform_(2.0, 6.0)
            layer.bn.bias.uniform_(0.0, 1.0)
    q = CBPQuantizer(net, "ternary", exclude=[])
    model, export = q.finalize()
    model.eval()
    x = (torch.rand(4, 2, 3, 8, 8) < 0.3).float()
    with torch.no_grad():
        expected = model(x)
        for layer in model:
            layer.reset()
        pack_model(model, {name: None for name in export})
        assert all(isinstance(layer, PackedLIFConv2d) for layer in model)
        got = model(x)
    assert expected.sum() > 0, "no spike at all: the test would prove nothing"
    mismatch = (got != expected).float().mean().item()
    # BN is folded into the float conv but applied after the exact popcount count in the packed
    # layer: rounding differs in the last bit, so a spike exactly at threshold may flip.
    assert mismatch <= 0.005, f"{mismatch:.2%} of the spikes differ"


def test_pack_model_refuses_layers_with_unknown_submodules():
    from cbp_kernels.export import pack_model

    class ConvWithChild(torch.nn.Conv2d):
        def __init__(self):
            super().__init__(4, 8, 3, bias=False)
            self.post = torch.nn.ReLU()

    with torch.no_grad():
        net = torch.nn.Sequential(ConvWithChild())
        net[0].weight.copy_(torch.sign(torch.randn_like(net[0].weight)) * 0.5)
    with pytest.raises(NotImplementedError, match="post"):
        pack_model(net, {"0": "binary"})

def test_plots_of_histories_without_cfs_or_g(tmp_path):
    from cbp_kernels.quant.plots import plot_comparison, plot_history

    assert plot_history([{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}], tmp_path / "loss.png").stat().st_size
    with pytest.raises(KeyError):  # neither the metric, CFS nor the loss: nothing to draw
        plot_history([{"epoch": 0, "temperature": 5.0}], tmp_path / "t.png")
    with pytest.raises(ValueError, match="one entry per method"):
        plot_comparison(["CBP", "CQ"], [90.0], [1e5, 2e5], tmp_path / "c.png")
