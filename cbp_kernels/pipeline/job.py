"""The job of ``cbp-quantize run`` / ``compare``: pre-train (or load) the FP32 model, quantize
a copy to each level set with each method, force the weights onto the levels, pack, check
the packed predictions, export, evaluate, plot (the stages: ``stages.py``); and ``eval`` of
an export, ``read_run`` of a run directory. Everything a run writes lands in its run
directory; each stage's ``result.json`` marks it done, so ``run(resume=DIR)`` continues
where a killed run stopped."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..export import atomic_write
from .config import (CONFIG_NAME, RunError, check_environment, create_run_dir, flush_denormals, load_config,
                     read_json, resolve_config, stage_dir, stages)
from .stages import (_accuracy, _arch_for, _barrier, _broadcast, _build_model, _check_finite, _check_fits,
                     _check_stages, _cq_stage, _datasets, _fp32_stage, _Job, _labels, _predict, _quant_stage,
                     _read_run_file, _setup_dist, _show_progress, _test_is_train, _write_json)
from .tables import result_table, row_name

__all__ = ["run", "RunResult", "evaluate_export", "read_run", "RunStatus"]


@dataclass
class RunResult:
    """What ``run`` returns: the run directory (absolute), its configuration (as in its
    config.json), one row per stage (plain dicts, as in summary.json: ``precision``,
    ``method``, ``accuracy`` (%), ``weight_bits``, ``seconds_per_epoch``; quantized stages
    add ``levels``, ``epochs``, ``layers`` (per layer: ``scale``, ``cfs`` (CBP, before
    forcing), ``moved_fraction``, ``mean_shift``, ``weights``), packable ones
    ``packed_accuracy``, ``same_predictions``, ``mismatches``, ``export``), the printed table
    the exit status of ``cbp-quantize`` (1 when a packed model disagrees) and whether this
    process is rank 0 (under torchrun every rank returns the result; rank 0 reports it)."""

    run_dir: str
    config: dict
    rows: list[dict]
    table: str
    status: int = 0
    main: bool = True


# ----------------------------------------------------------------------------- run


def _check_run_files(run_dir: str, cfg: dict) -> None:
    """Before a resume changes anything: every checkpoint and result of the run is readable."""
    for name in ["pretrained.pt"] + [os.path.join(stage_dir(m, label), f) for m, label, _ in stages(cfg)
                                     for f in ("last.pt", "result.json")]:
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            read_json(path, "stage result") if name.endswith(".json") else _read_run_file(path)


def run(resume: str | None = None, *, say: Callable[[str], None] | None = print, progress: bool | None = None,
        allow_env_change: bool = False, **options) -> RunResult:
    """Runs the ``cbp-quantize run`` job from Python; returns its ``RunResult``.

    ``options``: the options of ``cbp-quantize run`` / ``compare`` with underscores
    (``model``, ``data``, ``data_path``, ``checkpoint``, ``levels`` (``"binary,ternary"``),
    ``preset``, ``epochs``, ``pretrain_epochs``, ``pretrain_lr``, ``batch_size``,
    ``timesteps``, ``image_size``, ``device``, ``workers``, ``out``, ``seed``, ``method``:
    ``cbp`` / ``sigmoid`` / ``cq`` / ``compare``, ``amp``, ``float_forward``,
    ``flush_denormal``: set here, before any tensor work, see ``config.flush_denormals``);
    None or absent: the default. ``resume``:
    a run directory to continue with its saved configuration (no other options), from any
    working directory; a changed thread count or world size is refused unless
    ``allow_env_change`` (then recorded). ``say``: where progress lines go (None: nowhere;
    rank 0 only under torchrun). ``progress``: tqdm bars (default: when stderr is a terminal;
    otherwise one line per epoch).

    Raises RunError (a ValueError) for any bad option, file or data, before the run
    directory is created; FloatingPointError when training diverges."""
    cfg, run_dir, out = _start(resume, options)
    if cfg.get("flush_denormal"):  # before any tensor work (runs saved before the option have none)
        flush_denormals()
    threads = torch.get_num_threads()
    dist = _setup_dist(cfg["device"])
    if resume is not None:
        cfg["environment_changes"] = check_environment(cfg, threads, dist.world, allow_env_change)
    cfg.update(threads=threads, world_size=dist.world, resolved_device=str(dist.device))
    torch.manual_seed(cfg["seed"])
    train, test = _datasets(cfg)
    cfg["timesteps"] = train.timesteps
    cfg["arch"] = _arch_for(cfg, train)
    model = _build_model(cfg)  # a bad --model / --checkpoint fails here, before any file is written
    _check_fits(model, train, cfg["timesteps"], f"--model {cfg['model']}")
    _check_stages(model, cfg)
    say_main = (say or (lambda line: None)) if dist.main else (lambda line: None)
    if run_dir is None:  # everything is checked: now the run directory (rank 0's, or its error on every rank)
        run_dir = _broadcast(_claim(out) if dist.main else None, dist)
        if isinstance(run_dir, RunError):
            raise run_dir
    if dist.main:
        _write_json(os.path.join(run_dir, CONFIG_NAME), cfg)
    say_main(f"cbp-quantize: {cfg['model']} on {cfg['data']} (T={cfg['timesteps']}, {dist.world} process(es) on "
             f"{dist.device}, {threads} thread(s) each), output in {run_dir}")
    if _test_is_train(cfg):
        say_main(f"note: --data-path {cfg['data_path']} is one file: it is both the train and the test set, so "
                 "test accuracy is training accuracy (give a directory holding train.npz and test.npz)")
    bars = _show_progress(progress) and say is not None
    job = _Job(cfg, train, test, dist, run_dir, say_main, bars, epoch_lines=not bars)
    rows = [_fp32_stage(model, job)]
    for method, label, levels in stages(cfg):
        rows.append(_cq_stage(job) if method == "cq" else _quant_stage(method, label, levels, model, job))
    table = result_table(cfg, rows)
    if dist.main:
        _write_summary(run_dir, cfg, rows, table)
    _barrier(dist)  # every rank returns once the run directory is complete
    bad = [r["precision"] for r in rows if r.get("same_predictions") is False]
    if bad:
        say_main(f"cbp-quantize: the packed model's predictions differ from the float model's for {bad}")
    return RunResult(run_dir, cfg, rows, table, 1 if bad else 0, dist.main)


def _claim(out: str | None) -> str | RunError:
    """``create_run_dir(out)``, or its RunError as a value (to be raised on every rank)."""
    try:
        return create_run_dir(out)
    except RunError as exc:
        return exc


def _start(resume: str | None, options: dict) -> tuple[dict, str | None, str | None]:
    """``(config, run directory, --out)``: a resumed run's saved config and directory (its
    files checked readable), or a new run's resolved config (no directory yet)."""
    if resume is None:
        cfg = resolve_config(options)
        return cfg, None, cfg.pop("out")
    given = ["--" + k.replace("_", "-") for k, v in sorted(options.items()) if v is not None]
    if given:
        raise RunError(f"--resume continues with the run's saved config; drop {given}")
    cfg = load_config(resume)
    _check_run_files(resume, cfg)
    return cfg, os.path.abspath(resume), None


def _write_summary(run_dir: str, cfg: dict, rows: list[dict], table: str) -> None:
    """summary.json (the rows), table.txt, and for ``compare`` compare.md and compare.png."""
    _write_json(os.path.join(run_dir, "summary.json"), {"model": cfg["model"], "data": cfg["data"], "rows": rows})
    atomic_write(os.path.join(run_dir, "table.txt"), table + "\n")
    if cfg.get("method") == "compare":
        from ..quant.plots import plot_comparison

        atomic_write(os.path.join(run_dir, "compare.md"), table + "\n")
        plot_comparison([row_name(r) for r in rows], [r["accuracy"] for r in rows], [r["weight_bits"] for r in rows],
                        os.path.join(run_dir, "compare.png"),
                        title=f"{os.path.basename(run_dir)}: {cfg['model']} on {cfg['data']}")


# ----------------------------------------------------------------------------- eval and report


def evaluate_export(path: str, data: str | None = None, data_path: str | None = None, split: str = "test",
                    batch_size: int = 128, device: str | None = None) -> dict:
    """Accuracy of an exported packed model (``model.safetensors`` of a run) on ``split`` of
    a data set (default: the run's, its path as recorded). Returns ``{"accuracy" (%),
    "levels", "data", "split", "samples", "timesteps", "main"}`` (``main``: this process is
    rank 0, the one that reports); RunError for a bad file, option or data."""
    from ..data import get_dataset
    from ..export import load_packed, read_metadata

    if not os.path.isfile(path):
        raise RunError(f"eval: {path} is not a file (give a model.safetensors of a run)")
    try:
        meta = read_metadata(path)
        model = load_packed(path)
    except (ValueError, KeyError, OSError) as exc:
        raise RunError(f"eval: cannot load {path}: {exc}") from None
    if batch_size < 1:
        raise RunError(f"--batch-size must be a positive integer, got {batch_size}")
    from .config import _check_device

    _check_device(device)
    name = data or meta.get("data", "digits")
    root = data_path if data else (data_path or meta.get("data_path"))
    if root and not data_path:  # recorded absolute; older exports relative to their run directory
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), root))
    options = {"image_size": meta["image_size"]} if meta.get("image_size") else {}
    try:
        dataset = get_dataset(name, root, split, meta.get("timesteps"), **options)
    except (ValueError, FileNotFoundError, OSError, ImportError) as exc:
        raise RunError(f"--data {name}: {exc}") from None
    dataset = _check_finite(dataset, name, split)
    _check_fits(model, dataset, dataset.timesteps, f"the packed model {path} ({meta['arch']['name']})")
    dist = _setup_dist(device)
    model.to(dist.device)
    preds = _predict(model, dataset, dataset.timesteps, dist, batch_size)
    return {"accuracy": _accuracy(preds, _labels(dataset, dist), dist), "levels": meta.get("levels", "?"),
            "data": name, "split": split, "samples": len(dataset), "timesteps": dataset.timesteps,
            "main": dist.main}


@dataclass
class RunStatus:
    """What ``read_run`` finds in a run directory: ``finished``, the configuration, the rows
    of the stages done (as ``RunResult.rows``), their table (None when no stage is done),
    ``stages`` (done, total), ``current`` (the unfinished stage's progress: ``stage``,
    ``epochs_done``, ``epochs``, ``batch`` within the next epoch, ``last_record``; None when
    finished or not started) and the run's files (PNG, safetensors, jsonl, md)."""

    run_dir: str
    finished: bool
    config: dict
    rows: list[dict]
    table: str | None
    stages: tuple[int, int]
    current: dict | None
    files: list[str]


def read_run(run_dir: str) -> RunStatus:
    """The state of the run in ``run_dir`` (finished, or how far a running / killed one got);
    RunError naming an unreadable config.json, summary or result file."""
    cfg = load_config(run_dir)
    summary = os.path.join(run_dir, "summary.json")
    all_stages = [("fp32", None)] + [(m, label) for m, label, _ in stages(cfg)]
    current = None
    if os.path.isfile(summary):
        rows, finished, done = read_json(summary, "run summary")["rows"], True, len(all_stages)
    else:  # a run still going or killed: the stages done so far
        rows = []
        for m, label, _ in stages(cfg):
            path = os.path.join(run_dir, stage_dir(m, label), "result.json")
            if not os.path.isfile(path):
                current = current or _stage_progress(run_dir, cfg, m, label)
                continue
            rows.append(read_json(path, "stage result"))
        finished, done = False, len(rows)
    files = [os.path.join(dirpath, name) for dirpath, _, names in sorted(os.walk(run_dir)) for name in sorted(names)
             if name.endswith((".png", ".safetensors", ".jsonl", ".md"))]
    table = result_table(cfg, rows) if rows else None
    return RunStatus(run_dir, finished, cfg, rows, table, (done, len(all_stages) - 1), current, files)


def _stage_progress(run_dir: str, cfg: dict, method: str, label: str | None) -> dict:
    """How far the unfinished stage got: its checkpoint's epoch and batch, its last
    metrics record."""
    stage = stage_dir(method, label)
    epochs = cfg["pretrain_epochs"] + cfg["epochs"] if method == "cq" else cfg["epochs"]
    progress = {"stage": stage, "epochs_done": 0, "epochs": epochs, "batch": 0, "last_record": None}
    checkpoint = os.path.join(run_dir, stage, "last.pt")
    if os.path.isfile(checkpoint):
        state = _read_run_file(checkpoint)
        progress.update(epochs_done=int(state["epoch"]), batch=int(state["batch"]))
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            mine = [r for r in (json.loads(line) for line in f if line.strip()) if r.get("stage") == stage]
        progress["last_record"] = mine[-1] if mine else None
    return progress
