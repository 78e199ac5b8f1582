"""The stages of the job and what they share: processes (torchrun), data (checked once at
load), the model, FP32 pre-training, evaluation, the quantization stages (CBP, sigmoid-sum)
and CQ's. Each stage writes into the run directory and marks itself done with its
``result.json`` (its row of the result table)."""
from __future__ import annotations

import atexit
import copy
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from ..export import atomic_write
from .config import CQ_WEIGHT_BITS, METHODS, RunError, read_checkpoint, read_json, stage_dir, stages


# ----------------------------------------------------------------------------- processes


@dataclass
class _Dist:
    """The process's place in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(device: str | None) -> _Dist:
    """The process's place in a torchrun job. Under torchrun the first job of the process
    joins the process group (gloo on CPU, NCCL on CUDA) and later ones reuse it (a second
    ``init_process_group`` in one process hangs in the rendezvous); the group is destroyed at
    the interpreter's exit, before torch's own clean-up: a gloo group left to that clean-up can
    abort the process ("terminate called without an active exception", seen in CI;
    pytorch/pytorch#190489)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist(0, 1, dev)
    import torch.distributed as dist

    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return _Dist(dist.get_rank(), dist.get_world_size(), dev)


def _broadcast(value, dist: _Dist):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if dist.world == 1:
        return value
    import torch.distributed as tdist

    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(dist: _Dist) -> None:
    """Waits for every rank (a no-op without torchrun)."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def _write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _show_progress(progress: bool | None) -> bool:
    """Progress bars only where someone watches: default on when stderr is a terminal (no
    carriage-return bars in a log file)."""
    return sys.stderr.isatty() if progress is None else progress


# ----------------------------------------------------------------------------- data and models


class _FiniteSamples(Dataset):
    """A streamed data set whose samples are checked as they are read (the first pass of
    training refuses a NaN/Inf sample, naming it, before any checkpoint holds its effect)."""

    def __init__(self, base, name: str):
        self.base, self.name = base, name

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, attr):
        if attr in ("base", "name"):
            raise AttributeError(attr)
        return getattr(self.base, attr)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise RunError(f"--data {self.name}: sample {i} holds NaN/Inf values")
        return x, y


def _check_finite(dataset, name: str, split: str):
    """``dataset`` with every sample known finite: an in-memory set (``images`` / ``frames``)
    is checked now, whole (RunError naming the split); a streamed one is wrapped so that each
    sample is checked when read."""
    import numpy as np

    held = next((getattr(dataset, a) for a in ("frames", "images") if hasattr(dataset, a)), None)
    if held is None:
        return _FiniteSamples(dataset, name)
    finite = (bool(torch.isfinite(held).all()) if isinstance(held, torch.Tensor) and held.is_floating_point() else
              bool(np.isfinite(held).all()) if isinstance(held, np.ndarray) and held.dtype.kind == "f" else True)
    if not finite:
        raise RunError(f"--data {name}: the {split} split holds NaN/Inf values; nothing was trained or written")
    return dataset


def _datasets(cfg: dict):
    from ..data import get_dataset

    options = {"image_size": cfg["image_size"]} if cfg["image_size"] else {}
    try:
        train = get_dataset(cfg["data"], cfg["data_path"], "train", cfg["timesteps"], **options)
        test = get_dataset(cfg["data"], cfg["data_path"], "test", train.timesteps, **options)
    except (ValueError, FileNotFoundError, OSError, ImportError) as exc:
        raise RunError(f"--data {cfg['data']}: {exc}") from None
    return _check_finite(train, cfg["data"], "train"), _check_finite(test, cfg["data"], "test")


def _test_is_train(cfg: dict) -> bool:
    """An npz data path that is one file: both splits read it."""
    return cfg["data"] == "npz" and os.path.isfile(cfg["data_path"])


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
    from ..data import time_major

    _reset_states(model)
    out = model(time_major(x, x.shape[1] if x.dim() == 5 else timesteps))  # event frames: their own T (timesteps_train)
    return out.mean(0) if out.dim() == 3 else out


def _ann_logits(model: nn.Module, x: torch.Tensor, timesteps: int) -> torch.Tensor:
    """The class scores of a model fed the static batch itself (CQ's ANN and its converted
    SNN, which repeats its input over T on its own)."""
    return model(x)


def _sample_shape(dataset) -> tuple[int, ...]:
    return tuple(dataset[0][0].shape[-3:])


@torch.no_grad()
def _check_fits(model: nn.Module, dataset, timesteps: int, what: str, logits=_logits) -> None:
    """One sample through ``model`` (eval mode, state reset after): RunError naming ``what``
    when the model does not take the data's samples or gives no score per class."""
    x = dataset[0][0].unsqueeze(0)
    training = model.training
    model.eval()
    try:
        out = logits(model, x, timesteps)
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{what} does not take the data's samples {list(x.shape[1:])}: {first}") from None
    finally:
        _reset_states(model)
        model.train(training)
    if out.shape != (1, dataset.num_classes):
        raise RunError(f"{what} gives scores of shape {list(out.shape[1:])} for a data set of "
                       f"{dataset.num_classes} classes")


def _arch_for(cfg: dict, train) -> dict:
    """The architecture record ``{"name", "kwargs"}`` of the run's model (what the export
    stores and ``load_packed`` rebuilds): the data set's class count, and its channels and
    image size where the model's constructor takes them."""
    import inspect

    from ..export import architectures

    builders = architectures()
    if cfg["model"] not in builders:
        raise RunError(f"--model {cfg['model']!r}: not a library model ({', '.join(sorted(builders))}) nor a file")
    c, h, _ = _sample_shape(train)
    offered = {"num_classes": train.num_classes, "in_channels": c, "image_size": h, "input_size": h}
    params = inspect.signature(builders[cfg["model"]]).parameters
    accepted = set(params) | ({"num_classes"} if any(p.kind is p.VAR_KEYWORD for p in params.values()) else set())
    return {"name": cfg["model"], "kwargs": {k: v for k, v in offered.items() if k in accepted}}


def _build_model(cfg: dict) -> nn.Module:
    """The FP32 model named by ``cfg['model']``, with ``cfg['checkpoint']`` loaded if given."""
    from ..export import build_architecture

    try:
        model = build_architecture(cfg["arch"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RunError(f"--model {cfg['model']}: {exc}") from None
    if cfg["checkpoint"]:
        from ..models.interop import load_checkpoint

        try:
            load_checkpoint(model, read_checkpoint(cfg["checkpoint"]))
        except (ValueError, KeyError, RuntimeError, FileNotFoundError, OSError) as exc:
            raise RunError(f"--checkpoint {cfg['checkpoint']}: {exc}") from None
    return model


# ----------------------------------------------------------------------------- training and evaluation


def _pretrain(model: nn.Module, train, cfg: dict, dist: _Dist, epochs: int, bars: bool) -> float | None:
    """FP32 training with Adam (``pretrain_lr``) and cross-entropy on the rate readout for
    ``epochs`` epochs. Returns the training seconds per epoch (None for 0 epochs)."""
    net = nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=cfg["pretrain_lr"])
    loader = _loader(train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"])
    seconds = 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        bar = tqdm(loader, desc=f"FP32 pre-train {epoch + 1}/{epochs}", disable=not (bars and dist.main),
                   leave=False, dynamic_ncols=True)
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
    return torch.cat([torch.as_tensor(y) for _, y in DataLoader(_shard(dataset, dist), batch_size=1024)])


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


def _weight_bits(model: nn.Module, levels: list[float] | int | None = None, quantized: list[str] = ()) -> int:
    """The paper's weight memory: quantized layers at ceil(log2 |Q|) bits (``levels``: Q or
    its size), the rest FP32."""
    from ..memory import memory_report

    weight_layers = (nn.modules.conv._ConvNd, nn.Linear)
    fp32 = [n for n, m in model.named_modules() if isinstance(m, weight_layers) and n not in quantized]
    return memory_report(model, levels, fp32_layers=fp32, print_table=False).total_bits


def _write_metrics(run_dir: str, stage: str, history: list[dict]) -> None:
    """metrics.jsonl: one JSON record per (stage, epoch), with the time (UTC) it was first
    written; this stage's records are replaced by ``history`` (so a resumed run never repeats
    an epoch written after its last checkpoint)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    records, times = [], {}
    if os.path.exists(path):
        with open(path) as f:
            for r in map(json.loads, filter(str.strip, f)):
                if r.get("stage") == stage:
                    times[r.get("epoch")] = r.get("time")
                else:
                    records.append(r)
    records += [{"stage": stage, "time": times.get(r["epoch"]) or _now(),
                 **{k: v for k, v in r.items() if k not in ("weight_hist", "hist_range")}} for r in history]
    atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _epoch_line(stage: str, record: dict) -> str:
    return f"{stage}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in record.items() if k not in ("weight_hist", "hist_range"))


@torch.no_grad()
def _layer_results(quantizer, method: str) -> dict[str, dict]:
    """Per quantized layer, before forcing: the windowless CFS (CBP: mean cs(W) of the layer)
    and the weights (to measure what forcing moves, see ``_forcing_moves``)."""
    from ..ops import constraint_pass

    out = {}
    for i, (name, layer) in enumerate(quantizer.layers.items()):
        w = layer.weight.detach()
        cfs = None
        if method == "cbp":
            levels = quantizer.levels.to(w.device)
            _, cs_sum = constraint_pass([w], [quantizer.lambdas[i]], levels, layer.weight_scale.reshape(1),
                                        float(quantizer.g))
            cfs = float(cs_sum) / w.numel()
        out[name] = {"cfs": cfs, "before": w.clone(), "weights": w.numel()}
    return out


@torch.no_grad()
def _forcing_moves(before: dict[str, dict], quantizer, export: dict) -> dict[str, dict]:
    """Per layer: its scale s, CFS before forcing, the fraction of weights that forcing
    W <- Q(W) moved by more than ``FORCE_TOLERANCE`` of the smallest level step (the
    definition of ``CBPQuantizer.forced_fraction``), and their mean shift |W - Q(W)| / s."""
    from ..quant.cbp import FORCE_TOLERANCE

    out = {}
    for name, r in before.items():
        scale = float(export[name]["scale"])
        levels = torch.tensor(export[name]["levels"])
        step = float((levels[1:] - levels[:-1]).min())
        shift = (quantizer.layers[name].weight.detach() - r["before"]).abs() / scale
        moved = float((shift > FORCE_TOLERANCE * step).float().mean())
        out[name] = {"scale": scale, "cfs": r["cfs"], "moved_fraction": moved,
                     "mean_shift": float(shift.mean()), "weights": r["weights"]}
    return out


# ----------------------------------------------------------------------------- stages


@dataclass
class _Job:
    """What every stage needs: the configuration, data, processes, run directory, output."""

    cfg: dict
    train: object
    test: object
    dist: _Dist
    run_dir: str
    say: Callable[[str], None]
    bars: bool
    epoch_lines: bool

    def epoch_end(self, stage: str, quantizer) -> Callable[[dict], None]:
        """fit's per-epoch callback: metrics.jsonl now (not one epoch later), a plain line
        where no progress bar shows the record."""
        def done(record: dict) -> None:
            if self.dist.main:
                _write_metrics(self.run_dir, stage, quantizer.history)
            if self.epoch_lines:
                self.say(_epoch_line(stage, record))
        return done


def _fp32_stage(model, job: _Job) -> dict:
    """Pre-trains ``model`` (or loads it) in FP32; its weights go to ``pretrained.pt``."""
    from ..quant import save_checkpoint

    cfg, dist = job.cfg, job.dist
    path = os.path.join(job.run_dir, "pretrained.pt")
    seconds = None
    if os.path.exists(path):
        model.load_state_dict(_read_run_file(path))
        model.to(dist.device)
    else:
        model.to(dist.device)
        if not cfg["checkpoint"]:
            torch.manual_seed(cfg["seed"])
            seconds = _pretrain(model, job.train, cfg, dist, cfg["pretrain_epochs"], job.bars)
        bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(f"FP32 pre-training diverged (NaN/Inf in {bad[:3]}): try a smaller "
                                     f"--pretrain-lr than {cfg['pretrain_lr']}; nothing was saved")
        if dist.main:
            save_checkpoint(path, model.state_dict())
    acc = _accuracy(_predict(model, job.test, cfg["timesteps"], dist), _labels(job.test, dist), dist)
    job.say(f"FP32: test accuracy {acc:.2f}%")
    return {"precision": "FP32", "method": "fp32", "accuracy": acc, "weight_bits": _weight_bits(model, None),
            "seconds_per_epoch": seconds}


def _quantizer(method: str, levels, net: nn.Module, cfg: dict):
    """The stage's quantizer on ``net`` (its layers swapped in place): CBPQuantizer for
    ``cbp``, SigmoidQuantizer for ``sigmoid``, with the run's hyper-parameters."""
    from ..quant import CBPConfig, CBPQuantizer, SigmoidConfig, SigmoidQuantizer

    if method == "cbp":
        return CBPQuantizer(net, levels=levels, config=CBPConfig(**cfg["cbp"]))
    return SigmoidQuantizer(net, levels, config=SigmoidConfig(**cfg["sigmoid"]))


def _check_stages(model: nn.Module, cfg: dict) -> None:
    """Each quantization stage's quantizer accepts the model and its level set (the
    quantizers validate; this runs them on a copy before anything is written)."""
    for method, label, levels in stages(cfg):
        if method != "cq":
            try:
                _quantizer(method, levels, copy.deepcopy(model), cfg)
            except (ValueError, TypeError) as exc:
                raise RunError(f"--levels {label} for --method {method}: {exc}") from None


def _quant_stage(method, label, levels, fp32_model, job: _Job) -> dict:
    """Quantizes a copy of ``fp32_model`` to one level set with ``method`` (``cbp``:
    CBPQuantizer, ``sigmoid``: SigmoidQuantizer), finalizes, packs, checks the packed
    predictions, exports, plots. CFS and g only for cbp."""
    from ..export import pack_model, save_packed
    from ..ops.levels import LevelSet
    from ..quant import plot_history, plot_weight_histograms

    cfg, dist = job.cfg, job.dist
    name, plot_file = METHODS[method]
    stage = stage_dir(method, label)
    directory = os.path.join(job.run_dir, stage)
    result_path = os.path.join(directory, "result.json")
    if os.path.exists(result_path):
        return read_json(result_path, "stage result")
    model = copy.deepcopy(fp32_model)
    net = nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    torch.manual_seed(cfg["seed"])
    quantizer = _quantizer(method, levels, net, cfg)
    loader = _loader(job.train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"])
    labels, T = _labels(job.test, dist), cfg["timesteps"]
    eval_times: list[float] = []

    def evaluate(_):
        start = time.perf_counter()
        accuracy = _accuracy(_predict(model, job.test, T, dist), labels, dist)
        eval_times.append(time.perf_counter() - start)
        return accuracy

    job.say(f"{name} {label}: {cfg['epochs']} epochs, {len(quantizer.layers)} quantized layers "
            f"{list(quantizer.layers)}")
    start = time.perf_counter()
    quantizer.fit(loader, F.cross_entropy, epochs=cfg["epochs"], forward_fn=lambda m, x: _logits(m, x, T),
                  eval_fn=evaluate, checkpoint_dir=directory, resume=True, progress=job.bars,
                  on_epoch_end=job.epoch_end(stage, quantizer))
    fit_seconds = time.perf_counter() - start - sum(eval_times)
    before = _layer_results(quantizer, method)
    _, export = quantizer.finalize()
    names = list(quantizer.layers)
    levels_list = quantizer.levels.tolist()
    float_preds = _predict(model, job.test, T, dist)
    result = {
        "precision": label, "method": method, "levels": levels_list,
        "accuracy": _accuracy(float_preds, labels, dist), "epochs": quantizer.epoch,
        "weight_bits": _weight_bits(model, levels_list, names), "quantized_layers": names,
        # the epochs trained in this process (a resumed run times only its own)
        "seconds_per_epoch": fit_seconds / len(eval_times) if eval_times else None,
        "layers": _forcing_moves(before, quantizer, export),
    }
    if method == "cbp":
        result.update(cfs_trained=quantizer.cfs_before, cfs=quantizer.cfs(), g=quantizer.g,
                      forced_fraction=quantizer.forced_fraction)
    result["export"] = os.path.join(directory, "model.safetensors")  # every level set: planes or codes
    if LevelSet(levels_list).popcount:
        packed_preds = _predict(pack_model(copy.deepcopy(model), dict.fromkeys(names)), job.test, T, dist)
        mismatches = int(_all_sum(float((packed_preds != float_preds).sum()), dist))
        result.update(packed_accuracy=_accuracy(packed_preds, labels, dist), same_predictions=mismatches == 0,
                      mismatches=mismatches)
    if dist.main:
        os.makedirs(directory, exist_ok=True)  # fit made it unless it ran no epoch
        save_packed(model, result["export"], layers=names, arch=cfg["arch"],
                    metadata={"levels": label, "method": method, "data": cfg["data"],
                              "data_path": cfg["data_path"], "timesteps": T, "image_size": cfg["image_size"],
                              "accuracy": result["accuracy"]})
        if quantizer.history:
            title = f"{os.path.basename(job.run_dir)}: {name} {label}"
            plot_history(quantizer.history, os.path.join(directory, plot_file), title=title)
            epochs = sorted({0, len(quantizer.history) // 2, len(quantizer.history) - 1})
            plot_weight_histograms(quantizer.history, epochs, os.path.join(directory, "weight_histograms.png"),
                                   levels=levels_list, title=title)
        _write_json(result_path, result)
    packed_note = (f"packed {result['packed_accuracy']:.2f}%, "
                   f"{'same' if result['same_predictions'] else str(result['mismatches']) + ' different'} predictions"
                   if "packed_accuracy" in result else "exported as level codes: no popcount layers")
    cfs_note = (f", CFS {result['cfs_trained']:.3g} -> {result['cfs']:.3g} by forcing, which moved "
                f"{100 * result['forced_fraction']:.1f}% of the weights") if method == "cbp" else ""
    job.say(f"{name} {label}: accuracy {result['accuracy']:.2f}% ({packed_note}){cfs_note}")
    return result


def _cq_stage(job: _Job) -> dict:
    """CQ (seed paper 003): trains the clamp-and-quantize ANN twin of DigitsNet
    (``digits_cq_ann``) on the static images for ``pretrain_epochs + epochs`` epochs (the
    training budget of the other methods), converts it to an IF SNN for T = the run's
    timesteps with ``CQ_WEIGHT_BITS``-bit fixed-point weights (``cq.to_snn``), and reports
    the SNN's accuracy, its weight memory (every layer at ``CQ_WEIGHT_BITS`` bits) and its
    agreement with the ANN's predictions. No packed model: the weights are not binary /
    ternary. The ANN trains under ``CQTrainer``: its checkpoint ``cq/last.pt`` lets
    ``--resume`` continue it exactly."""
    from ..models.digits_net import digits_cq_ann
    from ..quant import CQConfig, CQTrainer, plot_history

    cfg, dist, test = job.cfg, job.dist, job.test
    directory = os.path.join(job.run_dir, "cq")
    result_path = os.path.join(directory, "result.json")
    if os.path.exists(result_path):
        return read_json(result_path, "stage result")
    T, epochs = cfg["timesteps"], cfg["pretrain_epochs"] + cfg["epochs"]
    labels = _labels(test, dist)
    torch.manual_seed(cfg["seed"])
    ann = digits_cq_ann(T, num_classes=job.train.num_classes).to(dist.device)
    net = nn.parallel.DistributedDataParallel(ann) if dist.world > 1 else ann
    trainer = CQTrainer(net, CQConfig(timesteps=T, weight_bits=CQ_WEIGHT_BITS, lr=cfg["pretrain_lr"],
                                      batch_size=cfg["batch_size"], epochs=max(epochs, 1), seed=cfg["seed"]))
    job.say(f"CQ: training the clamp-and-quantize ANN for {epochs} epochs, then converting it to an IF SNN with "
            f"T={T}, {CQ_WEIGHT_BITS}-bit weights")
    eval_times: list[float] = []

    def evaluate(_):
        start = time.perf_counter()
        accuracy = _accuracy(_predict(ann, test, T, dist, logits=_ann_logits), labels, dist)
        eval_times.append(time.perf_counter() - start)
        return accuracy

    start = time.perf_counter()
    trainer.fit(_loader(job.train, cfg["batch_size"], dist, cfg["seed"], True, cfg["workers"]), F.cross_entropy,
                epochs=epochs, forward_fn=lambda m, x: _ann_logits(m, x, T), eval_fn=evaluate,
                checkpoint_dir=directory, resume=True, progress=job.bars, on_epoch_end=job.epoch_end("cq", trainer))
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
        if history:
            plot_history(history, os.path.join(directory, METHODS["cq"][1]),
                         title=f"{os.path.basename(job.run_dir)}: CQ ANN")
        _write_json(result_path, result)
    job.say(f"CQ: SNN accuracy {result['accuracy']:.2f}% (ANN {result['ann_accuracy']:.2f}%, same prediction on "
            f"{100 * result['agreement']:.1f}% of the test set)")
    return result


def _read_run_file(path: str):
    """A checkpoint the run wrote (``pretrained.pt``, ``last.pt``), or RunError naming it."""
    from ..quant import load_checkpoint

    try:
        return load_checkpoint(path)
    except Exception as exc:  # torch raises RuntimeError / EOFError / pickle errors for a torn file
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path}: unreadable checkpoint (empty or truncated?): {why}; delete it to redo its "
                       "stage") from None


