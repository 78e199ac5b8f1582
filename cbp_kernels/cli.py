"""cbp-quantize: quantize a spiking neural network's weights to binary / ternary levels with
constrained backpropagation (CBP), then export it as a bit-packed popcount model.

With no arguments it runs the embedded demo (no download, a few minutes on a laptop CPU):
pre-train a small spiking conv net on scikit-learn's 8x8 digits in FP32, quantize it to
binary and to ternary with CBP, force the weights onto the levels, check that the packed
popcount model predicts exactly what the float quantized model predicts, and print a
table like the paper's Table 1 (accuracy, weight memory, constraint-failure score CFS).

Subcommands:
  run      quantize a model (the default subcommand); --method cbp|sigmoid|cq picks CBP or a
           peer method of the seed papers (sigmoid-sum quantization, CQ training + conversion)
  compare  run cbp, sigmoid and cq on the same pre-trained model and data: one table, one plot
  eval     evaluate an exported packed model (.safetensors) on a data set
  report   print the result table of a finished (or partial) run directory

Examples:
  cbp-quantize                                          # the digits demo
  cbp-quantize run --levels ternary --epochs 20 --out runs/t
  cbp-quantize run --method sigmoid --levels binary     # the sigmoid-sum peer
  cbp-quantize compare --levels binary                  # cbp vs sigmoid vs cq on digits
  cbp-quantize run --model sew_resnet18 --checkpoint sew18.pth --data imagefolder \\
      --data-path /data/imagenet --preset sew-resnet/imagenet --device cuda
  torchrun --nproc-per-node=4 -m cbp_kernels run ...    # DistributedDataParallel
  cbp-quantize run --resume runs/20260101-120000        # continue a killed run exactly
  cbp-quantize eval runs/<run>/binary/model.safetensors
  cbp-quantize report runs/<run>
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from .export import atomic_write

__all__ = ["main", "build_parser", "parse_levels", "format_table", "format_compare", "format_memory"]

DEFAULT_LEVELS = "binary,ternary"
COMPARE_LEVELS = "binary"
RUN_DEFAULTS = dict(model="digits-net", data="digits", data_path=None, checkpoint=None, levels=DEFAULT_LEVELS,
                    preset=None, epochs=None, pretrain_epochs=4, pretrain_lr=1e-2, batch_size=None, timesteps=None,
                    device=None, out=None, seed=0, image_size=None, workers=0, method="cbp", amp=None)
# --method -> (name in tables, file name of the per-epoch plot); "compare" runs all three.
METHODS = {"cbp": ("CBP", "accuracy_cfs_g.png"), "sigmoid": ("Sigmoid-sum", "accuracy_temperature.png"),
           "cq": ("CQ", "accuracy.png")}
# CQ's converted SNN stores every weight in this fixed point (seed paper 003's 8-bit setting).
CQ_WEIGHT_BITS = 8


class CLIError(Exception):
    """A user error: printed as ``cbp-quantize: error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------- arguments


def parse_levels(text: str) -> list[tuple[str, str | list[float]]]:
    """``--levels`` -> [(label, level set)]. Names (``binary``, ``ternary``) are one set each;
    consecutive numbers form one custom set; ``;`` separates two custom sets.
    ``"binary,ternary"`` -> two sets; ``"-2,-1,0,1"`` -> one; ``"-1,1;-2,-1,0,1"`` -> two."""
    from .quant import resolve_levels

    sets: list[tuple[str, str | list[float]]] = []
    for part in text.split(";"):
        numbers: list[float] = []
        for token in (t.strip() for t in part.split(",")):
            try:
                numbers.append(float(token))
                continue
            except ValueError:
                pass
            if numbers:
                sets.append(("levels" + "_".join(f"{v:g}" for v in numbers), numbers))
                numbers = []
            if token:
                sets.append((token, token))
        if numbers:
            sets.append(("levels" + "_".join(f"{v:g}" for v in numbers), numbers))
    if not sets:
        raise CLIError(f"--levels: no level set in {text!r}")
    for label, levels in sets:
        try:
            resolve_levels(levels)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"--levels: {exc}") from None
    labels = [label for label, _ in sets]
    if len(set(labels)) != len(labels):
        raise CLIError(f"--levels: a level set is given twice in {text!r}")
    return sets


def _add_run_arguments(cmd: argparse.ArgumentParser, levels_default: str) -> None:
    """The options ``run`` and ``compare`` share."""
    from .data import DATASETS
    from .quant import PRESETS

    cmd.add_argument("--model", help="library model name (digits-net, sew_resnet18, ...) or a SpikingJelly-format "
                                     "checkpoint path (default: digits-net)")
    cmd.add_argument("--checkpoint", help="pre-trained weights for a library --model (SpikingJelly format); "
                                          "without one the model is pre-trained here in FP32")
    cmd.add_argument("--data", choices=sorted(DATASETS), help="data set (default: digits, embedded)")
    cmd.add_argument("--data-path", help="root of the data set (not for digits)")
    cmd.add_argument("--levels", help="comma-separated level sets: binary, ternary, or a custom set of numbers, "
                                      "written --levels=-2,-1,0,1 (';' between two custom sets); only binary and "
                                      "ternary pack into popcount layers; sigmoid needs sets symmetric about 0 "
                                      f"(default: {levels_default})")
    cmd.add_argument("--preset", help="CBP hyper-parameters of a row of the paper's Table 4: "
                                      f"{', '.join(sorted(PRESETS))} (default: the digits demo's settings)")
    cmd.add_argument("--epochs", type=int, help="quantization epochs per level set (default: the preset's); CQ "
                                                "trains its ANN for --pretrain-epochs + --epochs")
    cmd.add_argument("--pretrain-epochs", type=int,
                     help="FP32 pre-training epochs when no checkpoint is given (default 4)")
    cmd.add_argument("--pretrain-lr", type=float, help="Adam learning rate of the FP32 pre-training (default 1e-2)")
    cmd.add_argument("--batch-size", type=int, help="batch size per process (default: the preset's)")
    cmd.add_argument("--timesteps", type=int, help="T, timesteps per sample (default: the preset's / the data's)")
    cmd.add_argument("--image-size", type=int, help="crop size of imagefolder images (default 224)")
    cmd.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    cmd.add_argument("--workers", type=int, help="data loader worker processes (default 0)")
    cmd.add_argument("--out", help="output directory (default: runs/<timestamp>)")
    cmd.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config")
    cmd.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")
    cmd.add_argument("--amp", choices=("bf16", "fp16"), help="CBP in mixed precision: forward and loss under "
                     "torch.autocast, fp16 with a GradScaler; float32 weights and multipliers (CBPConfig.amp)")


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="cbp-quantize", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{run,compare,eval,report}")

    run = sub.add_parser("run", formatter_class=fmt, help="quantize a model with CBP or a peer method (default)",
                         description="Pre-train (if no checkpoint is given), quantize to each level set with "
                                     "--method, finalize, pack, export and print the result table. The output "
                                     "directory gets config.json, metrics.jsonl, pretrained.pt and, per level "
                                     "set, last.pt (checkpoint), model.safetensors (export) and PNG plots.")
    run.add_argument("--method", choices=sorted(METHODS),
                     help="cbp: constrained backpropagation; sigmoid: sigmoid-sum quantization (seed paper 001); "
                          "cq: clamp-and-quantize ANN training + conversion to an IF SNN with "
                          f"{CQ_WEIGHT_BITS}-bit weights (seed paper 003; digits only) (default: cbp)")
    _add_run_arguments(run, DEFAULT_LEVELS)
    cmp = sub.add_parser("compare", formatter_class=fmt, help="compare cbp, sigmoid and cq on the same model and data",
                         description="Runs the stages of `run` for cbp, sigmoid and cq on one pre-trained FP32 "
                                     "model and data set (digits) and writes compare.md (one table: accuracy, "
                                     "weight memory, seconds per epoch, CFS, packed = float predictions) and "
                                     "compare.png (accuracy and weight memory per method) in the run directory.")
    _add_run_arguments(cmp, COMPARE_LEVELS)

    ev = sub.add_parser("eval", formatter_class=fmt, help="evaluate an exported packed model",
                        description="Load a packed model (cbp_kernels.load_packed) and report its accuracy.")
    ev.add_argument("export", help="a model.safetensors written by `cbp-quantize run`")
    ev.add_argument("--data", choices=sorted(DATASETS), help="data set (default: the one of the run)")
    ev.add_argument("--data-path", help="root of the data set (default: the one of the run)")
    ev.add_argument("--split", choices=("train", "test"), default="test")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")

    rep = sub.add_parser("report", formatter_class=fmt, help="print the result table of a run",
                         description="Print the result table (and the files) of a run directory.")
    rep.add_argument("run_dir", help="the --out directory of a run")
    return parser


# ----------------------------------------------------------------------------- processes and files


@dataclass
class _Dist:
    """The process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(device: str | None) -> _Dist:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available in this torch build / machine")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist(0, 1, dev)
    import torch.distributed as dist

    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), dev)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# ----------------------------------------------------------------------------- data and models


def _datasets(cfg: dict):
    from .data import get_dataset

    options = {"image_size": cfg["image_size"]} if cfg["image_size"] else {}
    try:
        train = get_dataset(cfg["data"], cfg["data_path"], "train", cfg["timesteps"], **options)
        test = get_dataset(cfg["data"], cfg["data_path"], "test", train.timesteps, **options)
    except (ValueError, FileNotFoundError, OSError, ImportError) as exc:
        raise CLIError(f"--data {cfg['data']}: {exc}") from None
    return train, test


def _loader(dataset, batch_size: int, dist: _Dist, seed: int, shuffle: bool, workers: int) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): DistributedSampler, also for one process."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)


def _shard(dataset, dist: _Dist):
    """This rank's share of an evaluation set (no padding, so summed counts are exact)."""
    return dataset if dist.world == 1 else Subset(dataset, range(dist.rank, len(dataset), dist.world))


def _reset_states(model: nn.Module) -> None:
    for m in model.modules():
        reset = getattr(m, "reset", None)
        if callable(reset) and m is not model:
            reset()


def _logits(model: nn.Module, x: torch.Tensor, timesteps: int) -> torch.Tensor:
    """The model's class scores ``[N, classes]`` on a batch (rate readout: mean over T)."""
    from .data import time_major

    _reset_states(model)
    out = model(time_major(x, x.shape[1] if x.dim() == 5 else timesteps))  # event frames: their own T (timesteps_train)
    return out.mean(0) if out.dim() == 3 else out


def _ann_logits(model: nn.Module, x: torch.Tensor, timesteps: int) -> torch.Tensor:
    """The class scores of a model fed the static batch itself (CQ's ANN and its converted
    SNN, which repeats its input over T on its own)."""
    return model(x)


def _sample_shape(dataset) -> tuple[int, ...]:
    return tuple(dataset[0][0].shape[-3:])


def _build_model(cfg: dict) -> nn.Module:
    """The FP32 model named by ``cfg['model']``, with ``cfg['checkpoint']`` loaded if given."""
    from .export import build_architecture

    try:
        model = build_architecture(cfg["arch"])
    except (ValueError, TypeError, KeyError) as exc:
        raise CLIError(f"--model {cfg['model']}: {exc}") from None
    if cfg["checkpoint"]:
        from .models.interop import load_checkpoint

        try:
            load_checkpoint(model, _read_checkpoint(cfg["checkpoint"]))
        except (ValueError, KeyError, RuntimeError, FileNotFoundError, OSError) as exc:
            raise CLIError(f"--checkpoint {cfg['checkpoint']}: {exc}") from None
    return model


def _arch_for(cfg: dict, train) -> dict:
    """The architecture record ``{"name", "kwargs"}`` of the run's model (what the export
    stores and ``load_packed`` rebuilds): the data set's class count, and its channels and
    image size where the model's constructor takes them."""
    import inspect

    from .export import architectures

    builders = architectures()
    if cfg["model"] not in builders:
        raise CLIError(f"--model {cfg['model']!r}: not a library model ({', '.join(sorted(builders))}) nor a file")
    c, h, _ = _sample_shape(train)
    offered = {"num_classes": train.num_classes, "in_channels": c, "image_size": h, "input_size": h}
    params = inspect.signature(builders[cfg["model"]]).parameters
    accepted = set(params) | ({"num_classes"} if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set())
    return {"name": cfg["model"], "kwargs": {k: v for k, v in offered.items() if k in accepted}}


# ----------------------------------------------------------------------------- training and evaluation


def _pretrain(model: nn.Module, train, cfg: dict, dist: _Dist, epochs: int) -> float | None:
    """FP32 training with Adam (``--pretrain-lr``) and cross-entropy on the rate readout for
    ``epochs`` epochs. Returns the training seconds per epoch (None for 0 epochs)."""
    net = nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg["pretrain_lr"])
    loader = _loader(train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"])
    seconds = 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"FP32 pre-train {epoch + 1}/{epochs}", disable=not dist.main, leave=False,
                   dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(dist.device), y.to(dist.device)
            loss = F.cross_entropy(_logits(net, x, train.timesteps), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds += time.perf_counter() - start
    return seconds / epochs if epochs else None


@torch.no_grad()
def _predict(model: nn.Module, dataset, timesteps: int, dist: _Dist, batch_size: int = 256,
             logits=_logits) -> torch.Tensor:
    """Predicted classes (argmax of ``logits(model, x, T)``) of this rank's shard of
    ``dataset``, ``[n]`` int64 on the CPU."""
    model.eval()
    preds = [logits(model, x.to(dist.device), timesteps).argmax(1).cpu()
             for x, _ in DataLoader(_shard(dataset, dist), batch_size=batch_size)]
    model.train()
    return torch.cat(preds)


def _labels(dataset, dist: _Dist) -> torch.Tensor:
    """The labels of this rank's shard of ``dataset`` (the order of ``_predict``)."""
    return torch.cat([y for _, y in DataLoader(_shard(dataset, dist), batch_size=1024)])


def _all_sum(value: float, dist: _Dist) -> float:
    if dist.world == 1:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], dtype=torch.float64, device=dist.device if dist.device.type == "cuda" else "cpu")
    tdist.all_reduce(t)
    return float(t.item())


def _accuracy(preds: torch.Tensor, labels: torch.Tensor, dist: _Dist) -> float:
    correct = _all_sum(float((preds == labels).sum()), dist)
    return 100.0 * correct / _all_sum(float(len(labels)), dist)


# ----------------------------------------------------------------------------- run


def _demo_cbp_config():
    """CBP settings of the digits demo (no Table 4 row fits an 8x8 toy): Adam on the
    weights, a quick window schedule (p_max 2), on levels within 8 epochs."""
    from .quant import CBPConfig

    return CBPConfig(optimizer="adam", lr=1e-3, multiplier_optimizer="adam", lr_multiplier=1e-2, batch_size=64,
                     epochs=8, timesteps=4, p_max=2, lr_drop_g=None)


def _demo_sigmoid_config():
    """Sigmoid-sum settings of the digits demo: Adam, T = 10, 20, ... per epoch (capped at 200),
    so the sigmoids are near-hard steps within the CBP demo's 8 epochs."""
    from .quant import SigmoidConfig

    return SigmoidConfig(optimizer="adam", lr=1e-3, temperature0=10.0, temperature_max=200.0, batch_size=64, epochs=8)


def _resolve_config(args) -> dict:
    """The run's full configuration: defaults < preset < command line."""
    import dataclasses

    from .quant import get_preset

    given = {k: v for k, v in vars(args).items() if k in RUN_DEFAULTS and v is not None}
    cfg = {**RUN_DEFAULTS, **given}
    cfg["method"] = "compare" if args.command == "compare" else args.method or "cbp"
    if args.command == "compare" and args.levels is None:
        cfg["levels"] = COMPARE_LEVELS
    if os.path.exists(cfg["model"]) and cfg["checkpoint"] is None:
        cfg["checkpoint"], cfg["model"] = cfg["model"], _checkpoint_arch(cfg["model"])
    try:
        cbp = get_preset(cfg["preset"]) if cfg["preset"] else _demo_cbp_config()
    except ValueError as exc:
        raise CLIError(f"--preset: {exc}") from None
    cfg["epochs"] = cfg["epochs"] if cfg["epochs"] is not None else cbp.epochs
    cfg["batch_size"] = cfg["batch_size"] if cfg["batch_size"] is not None else cbp.batch_size
    if cfg["timesteps"] is None and cfg["preset"]:
        cfg["timesteps"] = cbp.timesteps
    for name in ("epochs", "batch_size", "timesteps", "pretrain_epochs", "image_size"):
        if cfg[name] is not None and cfg[name] < (0 if name in ("epochs", "pretrain_epochs") else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {cfg[name]}")
    if cfg["workers"] < 0:
        raise CLIError(f"--workers must be >= 0, got {cfg['workers']}")
    if cfg["data"] == "digits" and cfg["data_path"]:
        raise CLIError("--data-path: the digits data set is embedded, give no path (or choose --data)")
    if cfg["data"] != "digits" and not cfg["data_path"]:
        raise CLIError(f"--data {cfg['data']} needs --data-path")
    cfg["level_sets"] = parse_levels(cfg["levels"])
    methods = _methods(cfg)
    if "cq" in methods and (cfg["data"], cfg["model"]) != ("digits", "digits-net"):
        raise CLIError(f"--method cq: CQ's ANN is built for digits-net on digits only, got --model {cfg['model']} "
                       f"--data {cfg['data']}")
    if "sigmoid" in methods:
        from .ops.sigmoid_quant import level_table
        from .quant import resolve_levels

        for label, levels in cfg["level_sets"]:
            try:
                level_table(resolve_levels(levels))
            except ValueError as exc:
                raise CLIError(f"--levels {label} for --method sigmoid: {exc}") from None
    recipe = dict(epochs=max(cfg["epochs"], 1), batch_size=cfg["batch_size"], seed=cfg["seed"])
    cfg["cbp"] = dataclasses.asdict(dataclasses.replace(cbp, **recipe, amp=cfg["amp"] or cbp.amp))
    cfg["sigmoid"] = dataclasses.asdict(dataclasses.replace(_demo_sigmoid_config(), **recipe))
    if cfg["out"] is None:
        cfg["out"] = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return cfg


def _read_checkpoint(path: str):
    """A checkpoint file, read as tensors only when it allows (a SpikingJelly training
    checkpoint also pickles its ``args`` Namespace: then fully, as the user's own file)."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unreadable file: name it
        raise CLIError(f"cannot read the checkpoint {path}: {exc}") from None


def _checkpoint_arch(path: str) -> str:
    """The model name a SpikingJelly-style training checkpoint records (``args.model`` or
    ``arch``), for ``--model PATH``."""
    ckpt = _read_checkpoint(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    name = getattr(args, "model", None) or (args.get("model") if isinstance(args, dict) else None)
    name = name or (ckpt.get("arch") if isinstance(ckpt, dict) else None)
    if not isinstance(name, str):
        raise CLIError(f"--model {path}: the checkpoint does not name its architecture (no args.model / arch); "
                       f"give --model NAME --checkpoint {path}")
    return name


def _methods(cfg: dict) -> list[str]:
    """The methods a run's config asks for (``compare``: all of them)."""
    return list(METHODS) if cfg.get("method", "cbp") == "compare" else [cfg.get("method", "cbp")]


def _stages(cfg: dict) -> list[tuple[str, str | None, object]]:
    """``(method, level-set label, level set)`` of each quantization stage, in order: per
    method one per level set; cq one (its weights are fixed point, no level set)."""
    return [(m, label, levels) for m in _methods(cfg)
            for label, levels in ([(None, None)] if m == "cq" else cfg["level_sets"])]


def _stage_dir(method: str, label: str | None) -> str:
    """A stage's directory in the run: the level set's label for cbp, ``sigmoid-<label>``, ``cq``."""
    return {"cbp": label, "cq": "cq"}.get(method, f"{method}-{label}")


def _run(args) -> int:
    if args.resume:
        explicit = [k for k, v in vars(args).items() if k in (*RUN_DEFAULTS, "method") and v is not None]
        if explicit:
            flags = ["--" + k.replace("_", "-") for k in explicit]
            raise CLIError(f"--resume continues with the run's saved config; drop {flags}")
        path = os.path.join(args.resume, "config.json")
        if not os.path.isfile(path):
            raise CLIError(f"--resume {args.resume}: no config.json there (not a run directory)")
        cfg = _read_json(path)
        cfg["level_sets"] = [tuple(s) for s in cfg["level_sets"]]
    else:
        cfg = _resolve_config(args)
        if os.path.exists(os.path.join(cfg["out"], "config.json")):
            raise CLIError(f"--out {cfg['out']} holds a run already; continue it with --resume {cfg['out']}")
    dist = _setup_dist(cfg["device"])
    torch.manual_seed(cfg["seed"])
    train, test = _datasets(cfg)
    cfg["timesteps"] = train.timesteps
    cfg["arch"] = _arch_for(cfg, train)
    model = _build_model(cfg)  # a bad --model / --checkpoint fails here, before any file is written
    run_dir = cfg["out"]
    if dist.main:
        os.makedirs(run_dir, exist_ok=True)
        if not args.resume:
            _write_json(os.path.join(run_dir, "config.json"), {**cfg, "world_size": dist.world})
    say = print if dist.main else (lambda *a, **k: None)
    say(f"cbp-quantize: {cfg['model']} on {cfg['data']} (T={cfg['timesteps']}, {dist.world} process(es) on "
        f"{dist.device}), output in {run_dir}")

    rows = [_fp32_stage(model, cfg, train, test, dist, run_dir, say)]
    for method, label, levels in _stages(cfg):
        if method == "cq":
            rows.append(_cq_stage(cfg, train, test, dist, run_dir, say))
        else:
            rows.append(_quant_stage(method, label, levels, model, cfg, train, test, dist, run_dir, say))
    table = _result_table(cfg, rows)
    say("\n" + table)
    if dist.main:
        _write_json(os.path.join(run_dir, "summary.json"), {"model": cfg["model"], "data": cfg["data"], "rows": rows})
        atomic_write(os.path.join(run_dir, "table.txt"), table + "\n")
        if cfg.get("method") == "compare":
            from .quant.plots import plot_comparison

            atomic_write(os.path.join(run_dir, "compare.md"), table + "\n")
            plot_comparison([_row_name(r) for r in rows], [r["accuracy"] for r in rows],
                            [r["weight_bits"] for r in rows], os.path.join(run_dir, "compare.png"))
    bad = [r["precision"] for r in rows if r.get("same_predictions") is False]
    if bad:
        say(f"cbp-quantize: the packed model's predictions differ from the float model's for {bad}")
        return 1
    return 0


def _fp32_stage(model, cfg, train, test, dist, run_dir, say) -> dict:
    """Pre-trains ``model`` (or loads it) in FP32; its weights go to ``pretrained.pt``."""
    from .quant import load_checkpoint, save_checkpoint

    path = os.path.join(run_dir, "pretrained.pt")
    seconds = None
    if os.path.exists(path):
        model.load_state_dict(load_checkpoint(path))
        model.to(dist.device)
    else:
        model.to(dist.device)
        if not cfg["checkpoint"]:
            torch.manual_seed(cfg["seed"])
            seconds = _pretrain(model, train, cfg, dist, cfg["pretrain_epochs"])
        if dist.main:
            save_checkpoint(path, model.state_dict())
    labels = _labels(test, dist)
    acc = _accuracy(_predict(model, test, cfg["timesteps"], dist), labels, dist)
    say(f"FP32: test accuracy {acc:.2f}%")
    return {"precision": "FP32", "method": "fp32", "accuracy": acc, "weight_bits": _weight_bits(model, None),
            "seconds_per_epoch": seconds}


def _quant_stage(method, label, levels, fp32_model, cfg, train, test, dist, run_dir, say) -> dict:
    """Quantizes a copy of ``fp32_model`` to one level set with ``method`` (``cbp``:
    CBPQuantizer, ``sigmoid``: SigmoidQuantizer), finalizes, packs, checks the packed
    predictions, exports, plots. CFS and g only for cbp."""
    from .export import pack_model, save_packed
    from .ops.levels import LevelSet
    from .quant import CBPConfig, CBPQuantizer, SigmoidConfig, SigmoidQuantizer, plot_history, plot_weight_histograms

    name, plot_file = METHODS[method]
    stage = _stage_dir(method, label)
    stage_dir = os.path.join(run_dir, stage)
    result_path = os.path.join(stage_dir, "result.json")
    if os.path.exists(result_path):
        return _read_json(result_path)
    model = copy.deepcopy(fp32_model)
    net = nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    torch.manual_seed(cfg["seed"])
    if method == "cbp":
        quantizer = CBPQuantizer(net, levels=levels, config=CBPConfig(**cfg["cbp"]))
    else:
        quantizer = SigmoidQuantizer(net, levels, config=SigmoidConfig(**cfg["sigmoid"]))
    loader = _loader(train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"])
    labels, T = _labels(test, dist), cfg["timesteps"]
    eval_times: list[float] = []

    def evaluate(_):
        start = time.perf_counter()
        if dist.main:  # the records of the epochs before this one (fit appends this one after)
            _write_metrics(run_dir, stage, quantizer.history)
        accuracy = _accuracy(_predict(model, test, T, dist), labels, dist)
        eval_times.append(time.perf_counter() - start)
        return accuracy

    say(f"{name} {label}: {cfg['epochs']} epochs, {len(quantizer.layers)} quantized layers {list(quantizer.layers)}")
    start = time.perf_counter()
    quantizer.fit(loader, F.cross_entropy, epochs=cfg["epochs"], forward_fn=lambda m, x: _logits(m, x, T),
                  eval_fn=evaluate, checkpoint_dir=stage_dir, resume=True)
    fit_seconds = time.perf_counter() - start - sum(eval_times)
    if dist.main:
        _write_metrics(run_dir, stage, quantizer.history)
    quantizer.finalize()
    names = list(quantizer.layers)
    levels_list = quantizer.levels.tolist()
    float_preds = _predict(model, test, T, dist)
    result = {
        "precision": label, "method": method, "levels": levels_list,
        "accuracy": _accuracy(float_preds, labels, dist), "epochs": quantizer.epoch,
        "weight_bits": _weight_bits(model, levels_list, names), "quantized_layers": names,
        # the epochs trained in this process (a resumed run times only its own)
        "seconds_per_epoch": fit_seconds / len(eval_times) if eval_times else None,
    }
    if method == "cbp":
        result.update(cfs_trained=quantizer.cfs_before, cfs=quantizer.cfs(), g=quantizer.g,
                      forced_fraction=quantizer.forced_fraction)
    result["export"] = os.path.join(stage_dir, "model.safetensors")  # every level set: planes or codes
    if LevelSet(levels_list).popcount:
        packed_preds = _predict(pack_model(copy.deepcopy(model), dict.fromkeys(names)), test, T, dist)
        mismatches = int(_all_sum(float((packed_preds != float_preds).sum()), dist))
        result.update(packed_accuracy=_accuracy(packed_preds, labels, dist), same_predictions=mismatches == 0,
                      mismatches=mismatches)
    if dist.main:
        os.makedirs(stage_dir, exist_ok=True)  # fit made it unless it ran no epoch
        save_packed(model, result["export"], layers=names, arch=cfg["arch"],
                    metadata={"levels": label, "method": method, "data": cfg["data"],
                              "data_path": cfg["data_path"], "timesteps": T, "image_size": cfg["image_size"],
                              "accuracy": result["accuracy"]})
        if quantizer.history:
            plot_history(quantizer.history, os.path.join(stage_dir, plot_file))
            epochs = sorted({0, len(quantizer.history) // 2, len(quantizer.history) - 1})
            plot_weight_histograms(quantizer.history, epochs, os.path.join(stage_dir, "weight_histograms.png"),
                                   levels=levels_list)
        _write_json(result_path, result)
    packed_note = (f"packed {result['packed_accuracy']:.2f}%, "
                   f"{'same' if result['same_predictions'] else str(result['mismatches']) + ' different'} predictions"
                   if "packed_accuracy" in result else "exported as level codes: no popcount layers")
    cfs_note = (f", CFS {result['cfs_trained']:.3g} -> {result['cfs']:.3g} by forcing, which moved "
                f"{100 * result['forced_fraction']:.1f}% of the weights") if method == "cbp" else ""
    say(f"{name} {label}: accuracy {result['accuracy']:.2f}% ({packed_note}){cfs_note}")
    return result


def _cq_stage(cfg, train, test, dist, run_dir, say) -> dict:
    """CQ (seed paper 003): trains the clamp-and-quantize ANN twin of DigitsNet
    (``digits_cq_ann``) on the static images for ``pretrain_epochs + epochs`` epochs (the
    training budget of the other methods), converts it to an IF SNN for T = the run's
    timesteps with ``CQ_WEIGHT_BITS``-bit fixed-point weights (``cq.to_snn``), and reports
    the SNN's accuracy, its weight memory (every layer at ``CQ_WEIGHT_BITS`` bits) and its
    agreement with the ANN's predictions. No packed model: the weights are not binary /
    ternary. The ANN trains under ``CQTrainer``: its checkpoint ``cq/last.pt`` lets
    ``--resume`` continue it exactly."""
    from .models.digits_net import digits_cq_ann
    from .quant import CQConfig, CQTrainer, plot_history

    stage_dir = os.path.join(run_dir, "cq")
    result_path = os.path.join(stage_dir, "result.json")
    if os.path.exists(result_path):
        return _read_json(result_path)
    T, epochs = cfg["timesteps"], cfg["pretrain_epochs"] + cfg["epochs"]
    labels = _labels(test, dist)
    torch.manual_seed(cfg["seed"])
    ann = digits_cq_ann(T, num_classes=train.num_classes).to(dist.device)
    net = nn.parallel.DistributedDataParallel(ann) if dist.world > 1 else ann
    trainer = CQTrainer(net, CQConfig(timesteps=T, weight_bits=CQ_WEIGHT_BITS, lr=cfg["pretrain_lr"],
                                      batch_size=cfg["batch_size"], epochs=max(epochs, 1), seed=cfg["seed"]))
    say(f"CQ: training the clamp-and-quantize ANN for {epochs} epochs, then converting it to an IF SNN with "
        f"T={T}, {CQ_WEIGHT_BITS}-bit weights")
    eval_times: list[float] = []

    def evaluate(_):
        start = time.perf_counter()
        accuracy = _accuracy(_predict(ann, test, T, dist, logits=_ann_logits), labels, dist)
        eval_times.append(time.perf_counter() - start)
        return accuracy

    start = time.perf_counter()
    trainer.fit(_loader(train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"]), F.cross_entropy,
                epochs=epochs, forward_fn=lambda m, x: _ann_logits(m, x, T), eval_fn=evaluate,
                checkpoint_dir=stage_dir, resume=True, progress=dist.main)
    seconds = (time.perf_counter() - start - sum(eval_times)) / len(eval_times) if eval_times else None
    history = trainer.history
    ann_preds = _predict(ann, test, T, dist, logits=_ann_logits)
    snn, _ = trainer.finalize()
    snn_preds = _predict(snn, test, T, dist, logits=_ann_logits)
    weight_layers = [n for n, m in snn.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    result = {
        "precision": f"{CQ_WEIGHT_BITS}-bit", "method": "cq", "accuracy": _accuracy(snn_preds, labels, dist),
        "ann_accuracy": _accuracy(ann_preds, labels, dist),
        "agreement": _all_sum(float((snn_preds == ann_preds).sum()), dist) / _all_sum(float(len(labels)), dist),
        "weight_bits": _weight_bits(snn, 2 ** CQ_WEIGHT_BITS, weight_layers), "bits_per_weight": CQ_WEIGHT_BITS,
        "epochs": epochs, "timesteps": T, "seconds_per_epoch": seconds,
    }
    if dist.main:
        _write_metrics(run_dir, "cq", history)
        if history:
            plot_history(history, os.path.join(stage_dir, METHODS["cq"][1]))
        _write_json(result_path, result)
    say(f"CQ: SNN accuracy {result['accuracy']:.2f}% (ANN {result['ann_accuracy']:.2f}%, same prediction on "
        f"{100 * result['agreement']:.1f}% of the test set)")
    return result


def _weight_bits(model: nn.Module, levels: list[float] | int | None = None, quantized: list[str] = ()) -> int:
    """The paper's weight memory: quantized layers at ceil(log2 |Q|) bits (``levels``: Q or
    its size), the rest FP32."""
    from .memory import memory_report

    weight_layers = (nn.modules.conv._ConvNd, nn.Linear)
    fp32 = [n for n, m in model.named_modules() if isinstance(m, weight_layers) and n not in quantized]
    return memory_report(model, levels, fp32_layers=fp32, print_table=False).total_bits


def _write_metrics(run_dir: str, stage: str, history: list[dict]) -> None:
    """metrics.jsonl: one JSON record per (stage, epoch); this stage's records are replaced by
    ``history`` (so a resumed run never repeats an epoch written after its last checkpoint)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [r for r in map(json.loads, filter(str.strip, f)) if r.get("stage") != stage]
    records += [{"stage": stage, **{k: v for k, v in r.items() if k not in ("weight_hist", "hist_range")}}
                for r in history]
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


# ----------------------------------------------------------------------------- table, eval, report


def format_memory(bits: float) -> str:
    """Weight memory as the paper writes it: Mb = 10^6 bits, Kb = 10^3 bits, 3 significant digits."""
    return f"{bits / 1e6:.3g}Mb" if bits >= 1e6 else f"{bits / 1e3:.3g}Kb"


def format_table(model: str, data: str, rows: list[dict], method: str = "cbp") -> str:
    """The result table of a ``run`` in the layout of the paper's Table 1 (one row per
    precision); for CBP rows the CFS training reached (before the weights are forced onto the
    levels, which makes it 0) and the share of weights forcing moved (``CBPQuantizer.finalize``)."""
    head = ("Precision", "Accuracy (%)", "Packed model (%)", "Same predictions", "Weight memory", "CFS trained",
            "Forcing moved")
    body = []
    for r in rows:
        packed = "packed_accuracy" in r
        body.append((
            r["precision"].capitalize() if r["precision"] in ("binary", "ternary") else r["precision"],
            f"{r['accuracy']:.2f}",
            f"{r['packed_accuracy']:.2f}" if packed else "-",
            ("yes" if r["same_predictions"] else f"NO ({r['mismatches']})") if packed else "-",
            format_memory(r["weight_bits"]),
            f"{r['cfs_trained']:.3g}" if r.get("cfs_trained") is not None else "-",
            f"{100 * r['forced_fraction']:.1f}%" if r.get("forced_fraction") is not None else "-",
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = f"{model} on {data}: {METHODS[method][0]}-quantized weights"
    title += " (cf. the paper's Table 1)" if method == "cbp" else ""
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _row_name(row: dict) -> str:
    """A result row's name in the comparison: ``FP32``, ``CBP binary``, ``Sigmoid-sum ternary``, ``CQ 8-bit``."""
    method = row.get("method", "cbp")
    return "FP32" if method == "fp32" else f"{METHODS[method][0]} {row['precision']}"


def format_compare(model: str, data: str, timesteps: int, rows: list[dict]) -> str:
    """The markdown table of ``cbp-quantize compare``: one row per method (and level set),
    the FP32 model first; CFS for CBP rows, packed = float predictions for packable rows."""
    lines = [f"**{model} on {data}, T={timesteps}: weight quantization methods compared** (test accuracy; weight "
             "memory as the paper's Table 1: quantized layers at ceil(log2 |Q|) bits, first and last layers FP32; "
             f"CQ: every layer at {CQ_WEIGHT_BITS} bits)", "",
             "| Method | Accuracy (%) | Weight memory | Seconds / epoch | CFS | Packed = float predictions |",
             "|---|---:|---:|---:|---:|---|"]
    notes = []
    for r in rows:
        seconds = r.get("seconds_per_epoch")
        same = ("yes" if r["same_predictions"] else f"NO ({r['mismatches']} differ)") if "same_predictions" in r else "-"
        cfs = f"{r['cfs']:.3g}" if r.get("cfs") is not None else "-"
        lines.append(f"| {_row_name(r)} | {r['accuracy']:.2f} | {format_memory(r['weight_bits'])} | "
                     f"{'-' if seconds is None else f'{seconds:.2f}'} | {cfs} | {same} |")
        if r.get("method") == "fp32":
            notes.append("FP32: the pre-trained spiking DigitsNet every method but CQ starts from (its seconds are "
                         "of the FP32 pre-training).")
        if r.get("method") == "cq":
            notes.append(f"CQ: a clamp-and-quantize ANN trained {r['epochs']} epochs, converted to an IF SNN "
                         f"(T={r['timesteps']}) with {r['bits_per_weight']}-bit fixed-point weights; ANN accuracy "
                         f"{r['ann_accuracy']:.2f}%, the SNN predicts as the ANN on {100 * r['agreement']:.1f}% of "
                         "the test set.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def _result_table(cfg: dict, rows: list[dict]) -> str:
    """The table of a run: ``format_compare`` for ``compare``, else ``format_table``."""
    method = cfg.get("method", "cbp")
    if method == "compare":
        return format_compare(cfg["model"], cfg["data"], cfg["timesteps"], rows)
    return format_table(cfg["model"], cfg["data"], rows, method)


def _eval(args) -> int:
    from .data import get_dataset
    from .export import load_packed, read_metadata

    if not os.path.isfile(args.export):
        raise CLIError(f"eval: {args.export} is not a file (give a model.safetensors of a run)")
    try:
        meta = read_metadata(args.export)
        model = load_packed(args.export)
    except (ValueError, KeyError, OSError) as exc:
        raise CLIError(f"eval: cannot load {args.export}: {exc}") from None
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be a positive integer, got {args.batch_size}")
    name = args.data or meta.get("data", "digits")
    root = args.data_path if args.data else (args.data_path or meta.get("data_path"))
    options = {"image_size": meta["image_size"]} if meta.get("image_size") else {}
    try:
        dataset = get_dataset(name, root, args.split, meta.get("timesteps"), **options)
    except (ValueError, FileNotFoundError, OSError, ImportError) as exc:
        raise CLIError(f"--data {name}: {exc}") from None
    dist = _setup_dist(args.device)
    model.to(dist.device)
    preds = _predict(model, dataset, dataset.timesteps, dist, args.batch_size)
    acc = _accuracy(preds, _labels(dataset, dist), dist)
    if dist.main:
        print(f"{args.export}: {meta.get('levels', '?')} packed model, {name} {args.split} split "
              f"({len(dataset)} samples, T={dataset.timesteps}): accuracy {acc:.2f}%")
    return 0


def _report(args) -> int:
    summary = os.path.join(args.run_dir, "summary.json")
    config = os.path.join(args.run_dir, "config.json")
    if not os.path.isfile(config):
        raise CLIError(f"report: {args.run_dir} is not a run directory (no config.json)")
    cfg = _read_json(config)
    if os.path.isfile(summary):
        rows = _read_json(summary)["rows"]
        status = "finished"
    else:  # a run still going or killed: the stages done so far
        cfg["level_sets"] = [tuple(s) for s in cfg["level_sets"]]
        results = [os.path.join(args.run_dir, _stage_dir(m, label), "result.json") for m, label, _ in _stages(cfg)]
        rows = [_read_json(path) for path in results if os.path.isfile(path)]
        status = f"unfinished ({len(rows)} of {len(results)} stages done; continue with --resume)"
    print(f"run {args.run_dir}: {status}")
    if rows:
        print(_result_table(cfg, rows))
    for dirpath, _, files in sorted(os.walk(args.run_dir)):
        for name in sorted(files):
            if name.endswith((".png", ".safetensors", ".jsonl", ".md")):
                print("  " + os.path.join(dirpath, name))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cbp-quantize`` and ``python -m cbp_kernels``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # run is the default subcommand
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"run": _run, "compare": _run, "eval": _eval, "report": _report}[args.command](args)
    except CLIError as exc:
        parser.exit(2, f"cbp-quantize: error: {exc}\n")
    except FloatingPointError as exc:
        parser.exit(1, f"cbp-quantize: {exc}\n")
