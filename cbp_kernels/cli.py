"""cbp-quantize: quantize a spiking neural network's weights to binary / ternary levels with
constrained backpropagation (CBP), then export it as a bit-packed popcount model.

With no arguments it runs the embedded demo (no download, a few minutes on a laptop CPU):
pre-train a small spiking conv net on scikit-learn's 8x8 digits in FP32, quantize it to
binary and to ternary with CBP, force the weights onto the levels, check that the packed
popcount model predicts exactly what the float quantized model predicts, and print a
table like the paper's Table 1 (accuracy, weight memory, constraint-failure score CFS).

Subcommands:
  run     quantize a model (the default subcommand)
  eval    evaluate an exported packed model (.safetensors) on a data set
  report  print the result table of a finished (or partial) run directory

Examples:
  cbp-quantize                                          # the digits demo
  cbp-quantize run --levels ternary --epochs 20 --out runs/t
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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from .export import atomic_write

__all__ = ["main", "build_parser", "parse_levels"]

DEFAULT_LEVELS = "binary,ternary"
RUN_DEFAULTS = dict(model="digits-net", data="digits", data_path=None, checkpoint=None, levels=DEFAULT_LEVELS,
                    preset=None, epochs=None, pretrain_epochs=4, pretrain_lr=1e-2, batch_size=None, timesteps=None,
                    device=None, out=None, seed=0, image_size=None, workers=0)


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


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .quant import PRESETS

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="cbp-quantize", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{run,eval,report}")

    run = sub.add_parser("run", formatter_class=fmt, help="quantize a model with CBP (default)",
                         description="Pre-train (if no checkpoint is given), quantize with CBP to each level "
                                     "set, finalize, pack, export and print the result table. The output "
                                     "directory gets config.json, metrics.jsonl, pretrained.pt and, per level "
                                     "set, last.pt (checkpoint), model.safetensors (export) and PNG plots.")
    run.add_argument("--model", help="library model name (digits-net, sew_resnet18, ...) or a SpikingJelly-format "
                                     "checkpoint path (default: digits-net)")
    run.add_argument("--checkpoint", help="pre-trained weights for a library --model (SpikingJelly format); "
                                          "without one the model is pre-trained here in FP32")
    run.add_argument("--data", choices=sorted(DATASETS), help="data set (default: digits, embedded)")
    run.add_argument("--data-path", help="root of the data set (not for digits)")
    run.add_argument("--levels", help="comma-separated level sets: binary, ternary, or a custom set of numbers, "
                                      "written --levels=-2,-1,0,1 (';' between two custom sets); only binary and "
                                      f"ternary pack into popcount layers (default: {DEFAULT_LEVELS})")
    run.add_argument("--preset", help="CBP hyper-parameters of a row of the paper's Table 4: "
                                      f"{', '.join(sorted(PRESETS))} (default: the digits demo's settings)")
    run.add_argument("--epochs", type=int, help="CBP epochs per level set (default: the preset's)")
    run.add_argument("--pretrain-epochs", type=int,
                     help="FP32 pre-training epochs when no checkpoint is given (default 4)")
    run.add_argument("--pretrain-lr", type=float, help="Adam learning rate of the FP32 pre-training (default 1e-2)")
    run.add_argument("--batch-size", type=int, help="batch size per process (default: the preset's)")
    run.add_argument("--timesteps", type=int, help="T, timesteps per sample (default: the preset's / the data's)")
    run.add_argument("--image-size", type=int, help="crop size of imagefolder images (default 224)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    run.add_argument("--workers", type=int, help="data loader worker processes (default 0)")
    run.add_argument("--out", help="output directory (default: runs/<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved config")
    run.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")

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
    out = model(time_major(x, timesteps))
    return out.mean(0) if out.dim() == 3 else out


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


def _pretrain(model: nn.Module, train, cfg: dict, dist: _Dist) -> None:
    """FP32 training with Adam and cross-entropy on the rate readout (only without --checkpoint)."""
    net = nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg["pretrain_lr"])
    loader = _loader(train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"])
    for epoch in range(cfg["pretrain_epochs"]):
        loader.sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"FP32 pre-train {epoch + 1}/{cfg['pretrain_epochs']}", disable=not dist.main,
                   leave=False, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(dist.device), y.to(dist.device)
            loss = F.cross_entropy(_logits(net, x, train.timesteps), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def _predict(model: nn.Module, dataset, timesteps: int, dist: _Dist, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes of this rank's shard of ``dataset``, ``[n]`` int64 on the CPU."""
    model.eval()
    preds = [_logits(model, x.to(dist.device), timesteps).argmax(1).cpu()
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


def _resolve_config(args) -> dict:
    """The run's full configuration: defaults < preset < command line."""
    import dataclasses

    from .quant import get_preset

    given = {k: v for k, v in vars(args).items() if k in RUN_DEFAULTS and v is not None}
    cfg = {**RUN_DEFAULTS, **given}
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
    cfg["cbp"] = dataclasses.asdict(dataclasses.replace(cbp, epochs=max(cfg["epochs"], 1), batch_size=cfg["batch_size"],
                                                        seed=cfg["seed"]))
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


def _run(args) -> int:
    if args.resume:
        explicit = [k for k, v in vars(args).items() if k in RUN_DEFAULTS and v is not None]
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
    rows += [_cbp_stage(label, levels, model, cfg, train, test, dist, run_dir, say)
             for label, levels in cfg["level_sets"]]
    table = format_table(cfg["model"], cfg["data"], rows)
    say("\n" + table)
    if dist.main:
        _write_json(os.path.join(run_dir, "summary.json"), {"model": cfg["model"], "data": cfg["data"], "rows": rows})
        atomic_write(os.path.join(run_dir, "table.txt"), table + "\n")
    bad = [r["precision"] for r in rows if r.get("same_predictions") is False]
    if bad:
        say(f"cbp-quantize: the packed model's predictions differ from the float model's for {bad}")
        return 1
    return 0


def _fp32_stage(model, cfg, train, test, dist, run_dir, say) -> dict:
    """Pre-trains ``model`` (or loads it) in FP32; its weights go to ``pretrained.pt``."""
    from .quant import load_checkpoint, save_checkpoint

    path = os.path.join(run_dir, "pretrained.pt")
    if os.path.exists(path):
        model.load_state_dict(load_checkpoint(path))
        model.to(dist.device)
    else:
        model.to(dist.device)
        if not cfg["checkpoint"]:
            torch.manual_seed(cfg["seed"])
            _pretrain(model, train, cfg, dist)
        if dist.main:
            save_checkpoint(path, model.state_dict())
    labels = _labels(test, dist)
    acc = _accuracy(_predict(model, test, cfg["timesteps"], dist), labels, dist)
    say(f"FP32: test accuracy {acc:.2f}%")
    return {"precision": "FP32", "accuracy": acc, "weight_bits": _weight_bits(model, None)}


def _cbp_stage(label, levels, fp32_model, cfg, train, test, dist, run_dir, say) -> dict:
    """CBP to one level set on a copy of ``fp32_model``, finalize, pack, check the packed
    predictions, export, plot."""
    from .export import PACKABLE, pack_model, save_packed
    from .quant import CBPConfig, CBPQuantizer, plot_history, plot_weight_histograms

    stage_dir = os.path.join(run_dir, label)
    result_path = os.path.join(stage_dir, "result.json")
    if os.path.exists(result_path):
        return _read_json(result_path)
    model = copy.deepcopy(fp32_model)
    net = nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    torch.manual_seed(cfg["seed"])
    quantizer = CBPQuantizer(net, levels=levels, config=CBPConfig(**cfg["cbp"]))
    loader = _loader(train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"])
    labels, T = _labels(test, dist), cfg["timesteps"]

    def evaluate(_):
        if dist.main:  # the records of the epochs before this one (fit appends this one after)
            _write_metrics(run_dir, label, quantizer.history)
        return _accuracy(_predict(model, test, T, dist), labels, dist)

    say(f"CBP {label}: {cfg['epochs']} epochs, {len(quantizer.layers)} quantized layers {list(quantizer.layers)}")
    quantizer.fit(loader, F.cross_entropy, epochs=cfg["epochs"], forward_fn=lambda m, x: _logits(m, x, T),
                  eval_fn=evaluate, checkpoint_dir=stage_dir, resume=True)
    if dist.main:
        _write_metrics(run_dir, label, quantizer.history)
    cfs_trained = quantizer.cfs()
    quantizer.finalize()
    names = list(quantizer.layers)
    levels_list = quantizer.levels.tolist()
    float_preds = _predict(model, test, T, dist)
    result = {
        "precision": label, "levels": levels_list, "accuracy": _accuracy(float_preds, labels, dist),
        "cfs_trained": cfs_trained, "cfs": quantizer.cfs(), "g": quantizer.g, "epochs": quantizer.epoch,
        "weight_bits": _weight_bits(model, levels_list, names), "quantized_layers": names,
    }
    if tuple(levels_list) in PACKABLE:
        packed_preds = _predict(pack_model(copy.deepcopy(model), dict.fromkeys(names)), test, T, dist)
        mismatches = int(_all_sum(float((packed_preds != float_preds).sum()), dist))
        result.update(packed_accuracy=_accuracy(packed_preds, labels, dist), same_predictions=mismatches == 0,
                      mismatches=mismatches, export=os.path.join(stage_dir, "model.safetensors"))
    if dist.main:
        os.makedirs(stage_dir, exist_ok=True)  # fit made it unless it ran no epoch
        if "export" in result:
            save_packed(model, result["export"], layers=names, arch=cfg["arch"],
                        metadata={"levels": label, "data": cfg["data"], "data_path": cfg["data_path"], "timesteps": T,
                                  "image_size": cfg["image_size"], "accuracy": result["accuracy"]})
        if quantizer.history:
            plot_history(quantizer.history, os.path.join(stage_dir, "accuracy_cfs_g.png"))
            epochs = sorted({0, len(quantizer.history) // 2, len(quantizer.history) - 1})
            plot_weight_histograms(quantizer.history, epochs, os.path.join(stage_dir, "weight_histograms.png"),
                                   levels=levels_list)
        _write_json(result_path, result)
    packed_note = (f"packed {result['packed_accuracy']:.2f}%, "
                   f"{'same' if result['same_predictions'] else str(result['mismatches']) + ' different'} predictions"
                   if "export" in result else "levels not packable: no popcount model / export")
    say(f"CBP {label}: accuracy {result['accuracy']:.2f}% ({packed_note}), "
        f"CFS {cfs_trained:.3g} -> {result['cfs']:.3g}")
    return result


def _weight_bits(model: nn.Module, levels: list[float] | None = None, quantized: list[str] = ()) -> int:
    """The paper's weight memory: quantized layers at ceil(log2 |Q|) bits, the rest FP32."""
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


def format_table(model: str, data: str, rows: list[dict]) -> str:
    """The result table in the layout of the paper's Table 1 (one row per precision)."""
    head = ("Precision", "Accuracy (%)", "Packed model (%)", "Same predictions", "Weight memory", "CFS")
    body = []
    for r in rows:
        packed = "packed_accuracy" in r
        body.append((
            r["precision"].capitalize() if r["precision"] in ("binary", "ternary") else r["precision"],
            f"{r['accuracy']:.2f}",
            f"{r['packed_accuracy']:.2f}" if packed else "-",
            ("yes" if r["same_predictions"] else f"NO ({r['mismatches']})") if packed else "-",
            format_memory(r["weight_bits"]),
            f"{r['cfs']:.3g}" if packed else "-",
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = f"{model} on {data}: CBP-quantized weights (cf. the paper's Table 1)"
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


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
        results = [os.path.join(args.run_dir, label, "result.json") for label, _ in cfg["level_sets"]]
        rows = [_read_json(path) for path in results if os.path.isfile(path)]
        status = f"unfinished ({len(rows)} of {len(cfg['level_sets'])} level sets done; continue with --resume)"
    print(f"run {args.run_dir}: {status}")
    if rows:
        print(format_table(cfg["model"], cfg["data"], rows))
    for dirpath, _, files in sorted(os.walk(args.run_dir)):
        for name in sorted(files):
            if name.endswith((".png", ".safetensors", ".jsonl")):
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
        return {"run": _run, "eval": _eval, "report": _report}[args.command](args)
    except CLIError as exc:
        parser.exit(2, f"cbp-quantize: error: {exc}\n")
    except FloatingPointError as exc:
        parser.exit(1, f"cbp-quantize: {exc}\n")
