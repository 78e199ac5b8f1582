"""A run's configuration: its options and defaults, their validation (every user error one
``RunError`` line naming the option or file, raised before anything is written), the run
directory (created atomically, unique) and the saved ``config.json`` of a resumed run.

The configuration is a plain JSON-able dict: the options of ``RUN_DEFAULTS`` (the
``cbp-quantize run`` flags without dashes) resolved against the preset, plus what the run
derives (``level_sets``, ``cbp`` / ``sigmoid`` hyper-parameters, ``timesteps``, ``arch``)
and records (``threads``, ``world_size``, ``resolved_device``). Paths in it are absolute,
so a run directory can be resumed, reported and evaluated from any working directory;
the run directory itself is not stored (it is wherever its ``config.json`` is)."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os

import torch

__all__ = ["RunError", "RUN_DEFAULTS", "METHODS", "CQ_WEIGHT_BITS", "parse_levels", "resolve_config",
           "load_config", "create_run_dir", "stages", "stage_dir", "methods", "check_environment", "flush_denormals",
           "read_json"]

DEFAULT_LEVELS = "binary,ternary"
COMPARE_LEVELS = "binary"
RUN_DEFAULTS = dict(model="digits-net", data="digits", data_path=None, checkpoint=None, levels=None,
                    preset=None, epochs=None, pretrain_epochs=4, pretrain_lr=1e-2, batch_size=None, timesteps=None,
                    device=None, out=None, seed=0, image_size=None, workers=0, method="cbp", amp=None,
                    float_forward=False, flush_denormal=False)
# method -> (name in tables, file name of the per-epoch plot); "compare" runs all three.
METHODS = {"cbp": ("CBP", "accuracy_cfs_g.png"), "sigmoid": ("Sigmoid-sum", "accuracy_temperature.png"),
           "cq": ("CQ", "accuracy.png")}
# CQ's converted SNN stores every weight in this fixed point (seed paper 003's 8-bit setting).
CQ_WEIGHT_BITS = 8
# Device types a run may name (torch.device accepts many more that nothing here runs on).
DEVICE_TYPES = ("cpu", "cuda")
CONFIG_NAME = "config.json"


class RunError(ValueError):
    """A user error (an option, a file, the data): one line naming it. ``cbp-quantize`` prints
    it as ``cbp-quantize: error: ...`` with exit status 2."""


def read_json(path: str, what: str = "file"):
    """A JSON file, or RunError naming it (missing, empty, truncated, not JSON)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: no such {what}") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable {what} (empty or truncated?): {exc}") from None


# ----------------------------------------------------------------------------- options


def parse_levels(text: str) -> list[tuple[str, str | list[float]]]:
    """``--levels`` -> [(label, level set)]. Names (``binary``, ``ternary``) are one set each;
    consecutive numbers form one custom set; ``;`` separates two custom sets. Each set is
    validated and labelled by ``LevelSet`` (numbers equal to a named set take its name).
    ``"binary,ternary"`` -> two sets; ``"-2,-1,0,1"`` -> one; ``"-1,1;-2,-1,0,1"`` -> two."""
    from ..ops.levels import LevelSet

    groups: list[str | list[float]] = []
    for part in text.split(";"):
        numbers: list[float] = []
        for token in (t.strip() for t in part.split(",")):
            try:
                value = float(token)
            except ValueError:
                pass
            else:
                if not math.isfinite(value):
                    raise RunError(f"--levels: {token} is not finite")
                numbers.append(value)
                continue
            if numbers:
                groups.append(numbers)
                numbers = []
            if token:
                groups.append(token)
        if numbers:
            groups.append(numbers)
    if not groups:
        raise RunError(f"--levels: no level set in {text!r}")
    sets = []
    for levels in groups:
        try:
            sets.append((LevelSet(levels).label, levels))
        except (ValueError, TypeError) as exc:
            raise RunError(f"--levels: {exc}") from None
    labels = [label for label, _ in sets]
    if len(set(labels)) != len(labels):
        raise RunError(f"--levels: a level set is given twice in {text!r}")
    return sets


def _demo_cbp_config():
    """CBP settings of the digits demo (no Table 4 row fits an 8x8 toy): Adam on the
    weights, a quick window schedule (p_max 2), on levels within 8 epochs."""
    from ..quant import CBPConfig

    return CBPConfig(optimizer="adam", lr=1e-3, multiplier_optimizer="adam", lr_multiplier=1e-2, batch_size=64,
                     epochs=8, timesteps=4, p_max=2, lr_drop_g=None)


def _demo_sigmoid_config():
    """Sigmoid-sum settings of the digits demo: Adam, T = 10, 20, ... per epoch (capped at 200),
    so the sigmoids are near-hard steps within the CBP demo's 8 epochs."""
    from ..quant import SigmoidConfig

    return SigmoidConfig(optimizer="adam", lr=1e-3, temperature0=10.0, temperature_max=200.0, batch_size=64, epochs=8)


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in DEVICE_TYPES:
        raise RunError(f"--device {device}: not a device this job runs on (cpu, cuda, cuda:1, ...)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {device}: CUDA is not available in this torch build / machine")


def resolve_config(options: dict) -> dict:
    """The run's full configuration from ``options`` (keys of ``RUN_DEFAULTS``, None = not
    given; ``method`` ``cbp`` / ``sigmoid`` / ``cq`` / ``compare``): defaults < preset < options.
    Validates every option (RunError naming it); writes nothing."""
    unknown = sorted(set(options) - set(RUN_DEFAULTS))
    if unknown:
        raise RunError(f"unknown run options {unknown}; known: {sorted(RUN_DEFAULTS)}")
    cfg = {**RUN_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if cfg["method"] not in (*METHODS, "compare"):
        raise RunError(f"--method {cfg['method']}: choose one of {sorted(METHODS)} (or compare)")
    if cfg["method"] == "cq" and cfg["levels"] is not None:
        raise RunError(f"--levels {cfg['levels']}: --method cq converts to {CQ_WEIGHT_BITS}-bit fixed-point weights, "
                       "it takes no level set")
    if cfg["levels"] is None:
        cfg["levels"] = COMPARE_LEVELS if cfg["method"] == "compare" else DEFAULT_LEVELS
    for name in ("data_path", "checkpoint", "out"):  # stored absolute: valid from any directory
        if cfg[name] is not None:
            cfg[name] = os.path.abspath(cfg[name])
    if os.path.exists(cfg["model"]) and cfg["checkpoint"] is None:
        cfg["checkpoint"] = os.path.abspath(cfg["model"])
        cfg["model"] = checkpoint_arch(cfg["checkpoint"])
    from ..quant import get_preset

    try:
        cbp = get_preset(cfg["preset"]) if cfg["preset"] else _demo_cbp_config()
    except ValueError as exc:
        raise RunError(f"--preset: {exc}") from None
    cfg["epochs"] = cfg["epochs"] if cfg["epochs"] is not None else cbp.epochs
    cfg["batch_size"] = cfg["batch_size"] if cfg["batch_size"] is not None else cbp.batch_size
    if cfg["timesteps"] is None and cfg["preset"]:
        cfg["timesteps"] = cbp.timesteps
    for name in ("epochs", "pretrain_epochs", "workers"):  # 0 epochs: round onto the levels / no pre-training
        if not isinstance(cfg[name], int) or cfg[name] < 0:
            raise RunError(f"--{name.replace('_', '-')} must be an integer >= 0, got {cfg[name]}")
    for name in ("batch_size", "timesteps", "image_size"):
        if cfg[name] is not None and (not isinstance(cfg[name], int) or cfg[name] < 1):
            raise RunError(f"--{name.replace('_', '-')} must be a positive integer, got {cfg[name]}")
    if not isinstance(cfg["pretrain_lr"], (int, float)) or not (math.isfinite(cfg["pretrain_lr"])
                                                                 and cfg["pretrain_lr"] > 0):
        raise RunError(f"--pretrain-lr must be a finite number > 0, got {cfg['pretrain_lr']}")
    _check_device(cfg["device"])
    if cfg["data"] == "digits" and cfg["data_path"]:
        raise RunError("--data-path: the digits data set is embedded, give no path (or choose --data)")
    if cfg["data"] != "digits" and not cfg["data_path"]:
        raise RunError(f"--data {cfg['data']} needs --data-path")
    cfg["level_sets"] = parse_levels(cfg["levels"])
    if "cq" in methods(cfg) and (cfg["data"], cfg["model"]) != ("digits", "digits-net"):
        raise RunError(f"--method cq: CQ's ANN is built for digits-net on digits only, got --model {cfg['model']} "
                       f"--data {cfg['data']}")
    recipe = dict(epochs=max(cfg["epochs"], 1), batch_size=cfg["batch_size"], seed=cfg["seed"])
    for name in ("float_forward", "flush_denormal"):
        if not isinstance(cfg[name], bool):
            raise RunError(f"--{name.replace('_', '-')} is a switch (true / false), got {cfg[name]!r}")
    integer_forward = False if cfg["float_forward"] else cbp.integer_forward
    cfg["cbp"] = dataclasses.asdict(dataclasses.replace(cbp, **recipe, amp=cfg["amp"] or cbp.amp,
                                                        integer_forward=integer_forward))
    cfg["sigmoid"] = dataclasses.asdict(dataclasses.replace(_demo_sigmoid_config(), **recipe))
    if cfg["out"] is not None and os.path.exists(os.path.join(cfg["out"], CONFIG_NAME)):
        raise RunError(f"--out {cfg['out']} holds a run already; continue it with --resume {cfg['out']}")
    return cfg


def read_checkpoint(path: str):
    """A checkpoint file, read as tensors only when it allows (a SpikingJelly training
    checkpoint also pickles its ``args`` Namespace: then fully, as the user's own file)."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file: name it
        raise RunError(f"cannot read the checkpoint {path}: {exc}") from None


def checkpoint_arch(path: str) -> str:
    """The model name a SpikingJelly-style training checkpoint records (``args.model`` or
    ``arch``), for ``--model PATH``."""
    ckpt = read_checkpoint(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    name = getattr(args, "model", None) or (args.get("model") if isinstance(args, dict) else None)
    name = name or (ckpt.get("arch") if isinstance(ckpt, dict) else None)
    if not isinstance(name, str):
        raise RunError(f"--model {path}: the checkpoint does not name its architecture (no args.model / arch); "
                       f"give --model NAME --checkpoint {path}")
    return name


def methods(cfg: dict) -> list[str]:
    """The methods a run's config asks for (``compare``: all of them)."""
    return list(METHODS) if cfg.get("method", "cbp") == "compare" else [cfg.get("method", "cbp")]


def stages(cfg: dict) -> list[tuple[str, str | None, object]]:
    """``(method, level-set label, level set)`` of each quantization stage, in order: per
    method one per level set; cq one (its weights are fixed point, no level set)."""
    return [(m, label, levels) for m in methods(cfg)
            for label, levels in ([(None, None)] if m == "cq" else cfg["level_sets"])]


def stage_dir(method: str, label: str | None) -> str:
    """A stage's directory in the run: the level set's label for cbp, ``sigmoid-<label>``, ``cq``."""
    return {"cbp": label, "cq": "cq"}.get(method, f"{method}-{label}")


# ----------------------------------------------------------------------------- run directories


def create_run_dir(out: str | None, root: str = "runs", now: datetime.datetime | None = None) -> str:
    """Creates the run directory and returns its absolute path: ``out``, or
    ``root/<timestamp>`` (``-2``, ``-3``, ... appended when a run of the same second has it).
    The claim is atomic: ``mkdir`` of a new timestamp directory, or an exclusive create of
    ``out/config.json``, so two runs never share a directory (the loser gets RunError for an
    ``out`` another run holds, or the next free timestamp)."""
    if out is not None:
        os.makedirs(out, exist_ok=True)
        try:
            os.close(os.open(os.path.join(out, CONFIG_NAME), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise RunError(f"--out {out} holds a run already; continue it with --resume {out}") from None
        return os.path.abspath(out)
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    os.makedirs(root, exist_ok=True)
    for i in range(1, 10_000):
        path = os.path.join(root, stamp if i == 1 else f"{stamp}-{i}")
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return os.path.abspath(path)
    raise RunError(f"{root}: no free run directory name for {stamp}")


def load_config(run_dir: str) -> dict:
    """The saved configuration of the run in ``run_dir`` (RunError for a directory without
    one or an unreadable one), its relative paths made relative to ``run_dir``."""
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} is not a run directory (no {CONFIG_NAME})")
    cfg = read_json(path, "run configuration")
    needed = ("model", "data", "level_sets", "epochs", "method", "cbp", "sigmoid", "arch", "timesteps")
    missing = [k for k in needed if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise RunError(f"{path}: not a complete run configuration (no {missing})")
    cfg["level_sets"] = [tuple(s) for s in cfg["level_sets"]]
    for name in ("data_path", "checkpoint"):  # older runs stored them as typed
        if cfg.get(name):
            cfg[name] = os.path.normpath(os.path.join(os.path.abspath(run_dir), cfg[name]))
    cfg.pop("out", None)
    return cfg


def check_environment(cfg: dict, threads: int, world: int, allow_change: bool) -> list[dict]:
    """Refuses to resume a run under another thread count or world size than it started with
    (its results would differ from an uninterrupted run's), unless ``allow_change``: then the
    change is appended to the returned ``cfg["environment_changes"]`` for config.json."""
    was = {"threads": cfg.get("threads", threads), "world_size": cfg.get("world_size", world)}
    now = {"threads": threads, "world_size": world}
    changes = list(cfg.get("environment_changes", []))
    if was != now:
        if not allow_change:
            raise RunError(f"--resume: the run was started with {was['threads']} torch thread(s) x "
                           f"{was['world_size']} process(es), this is {threads} x {world}: its results would "
                           f"differ from an uninterrupted run's; set OMP_NUM_THREADS={was['threads']} (torchrun "
                           f"--nproc-per-node={was['world_size']}) or pass --allow-env-change to continue anyway "
                           "(recorded in config.json)")
        changes.append({"from": was, "to": now, "at": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    return changes


def flush_denormals() -> None:
    """``--flush-denormal``: this process's CPU threads read and write every float below the
    smallest normal (float32 1.18e-38) as 0 (``torch.set_flush_denormal``; README "Denormals
    in CPU training"). The mode is per thread and torch's intra-op workers copy it only when
    they are created, at the first parallel tensor op, so it must come before any: a
    convolution on denormal products, run on every thread, checks that; RunError when a
    worker still computes them (set too late) or the CPU has no such mode."""
    if not torch.set_flush_denormal(True):
        raise RunError("--flush-denormal: this CPU has no flush-to-zero mode")
    # products 1e-42, denormal in float32; 4 images a thread: smaller convolutions ran on one thread
    tiny = torch.full((4 * torch.get_num_threads(), 8, 64, 64), 1e-21)
    if torch.nn.functional.conv2d(tiny, tiny[:8, :, :3, :3]).count_nonzero():
        torch.set_flush_denormal(False)
        raise RunError("--flush-denormal: torch's worker threads started before it and keep denormals; set it "
                       "before any tensor work (cbp-quantize does), or call torch.set_flush_denormal(True) "
                       "right after import torch")
