"""The training loop shared by the weight quantizers (``CBPQuantizer``, ``SigmoidQuantizer``):
layer selection and swapping, the weight optimizer, ``fit`` with progress, evaluation and
resumable atomic checkpoints. A quantizer subclass gives its layer class and its per-batch
``step`` / per-epoch ``end_epoch``; see ``QuantTrainer``'s hooks."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..nn.quantized import QuantizedLayer
from ..ops.levels import LevelSet
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["QuantTrainer", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"
# Bins of the per-epoch histogram of the weights in level units kept in the history.
HIST_BINS = 101


def weight_export(layer: QuantizedLayer) -> dict:
    """``{"codes", "scale", "levels"}`` of a quantized layer whose weight sits on its levels
    (after ``finalize``): int8 codes k with ``weight == levels[k] * scale`` (``LevelSet.encode``,
    the same codes ``cbp_kernels.export`` stores)."""
    levels = LevelSet(layer.levels)
    codes = levels.encode(layer.weight, layer.weight_scale)
    return {"codes": codes.cpu(), "scale": float(layer.weight_scale), "levels": list(levels.values)}


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, QuantizedLayer)


def _excluded_names(net: nn.Module, candidates: list[str], exclude: Iterable[str] | None) -> set[str]:
    """The quantizable layers not to quantize: the first and last by default, else those
    named in ``exclude`` (a layer, or a module holding layers: all of them)."""
    if exclude is None:
        return {candidates[0], candidates[-1]}
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a list of module names, got the string {exclude!r}")
    modules = dict(net.named_modules())
    excluded: set[str] = set()
    for name in exclude:
        if name not in modules or name == "":
            raise ValueError(f"exclude names {name!r}, which is not a module of the model")
        under = [c for c in candidates if c == name or c.startswith(name + ".")]
        if not under:
            kind = type(modules[name]).__name__
            raise ValueError(f"exclude names {name!r} ({kind}), which holds no quantizable layer")
        excluded.update(under)
    return excluded


_FUSED_SGD_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def clip_grad_value(params: list[torch.Tensor], clip: float) -> None:
    """``torch.nn.utils.clip_grad_value_`` (each gradient clamped to [-clip, clip], the same
    values): on CPU one clamp per tensor instead of its clamp_min and clamp_max passes."""
    grads = [p.grad for p in params if p.grad is not None]
    if any(g.device.type != "cpu" for g in grads):
        torch.nn.utils.clip_grad_value_(params, clip)
        return
    for g in grads:
        g.clamp_(-clip, clip)


def _swap(net: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)


def _build_weight_optimizer(config, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD (momentum) / Adam / AdamW over ``groups`` (each group carries its weight decay).
    SGD on CPU parameters without fp16's loss scale runs torch's fused kernel (one pass per
    tensor instead of three: 1.6x the optimizer step on SEW-ResNet-18's weights, one thread),
    whose updates are the per-tensor loop's bit for bit."""
    if config.optimizer == "sgd":
        params = [p for g in groups for p in g["params"]]
        fused = (getattr(config, "amp", None) != "fp16" and len(params) > 0
                 and all(p.device.type == "cpu" and p.dtype in _FUSED_SGD_DTYPES for p in params))
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=fused or None)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=config.lr)


def _autocast(config, device: torch.device):
    """``torch.autocast`` in ``config.amp``'s dtype on ``device`` (a no-op context without amp)."""
    from .config import AMP_DTYPES

    amp = getattr(config, "amp", None)
    dtype = getattr(torch, AMP_DTYPES[amp]) if amp else None
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """Makes the epoch's data order a function of (seed, epoch) only: seeds torch's global
    generator (used by RandomSampler and DataLoader worker seeds), any generator the loader
    or its sampler holds, and calls ``set_epoch`` of a DistributedSampler."""
    torch.manual_seed(seed + epoch)
    sampler = getattr(loader, "sampler", None)
    for gen in (getattr(loader, "generator", None), getattr(sampler, "generator", None)):
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed + epoch)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _to_device(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class QuantTrainer:
    """Base of the quantizers. The constructor swaps, IN PLACE, every quantizable layer
    (``nn.Conv2d`` / ``nn.Linear``, subclasses included) but the excluded ones for
    ``layer_cls.from_float(layer, levels)`` (``layer_cls=None``: keeps them) and builds the
    weight optimizer over every trainable parameter (``config.train_params="quantized"``: the
    quantized weights only). ``step(loss)`` / ``end_epoch()`` are the plain loss-only updates
    (CBP overrides them with Algorithm 1's); subclasses implement ``finalize()`` and
    ``_level_units(layer)`` and may extend ``_epoch_record``, ``_start_epoch``, ``_progress``,
    ``_extra_state`` / ``_load_extra_state`` / ``_extra_tensors`` and ``_before_swap``."""

    def __init__(self, model: nn.Module, levels: torch.Tensor, exclude: Iterable[str] | None, config,
                 layer_cls: type[QuantizedLayer] | None):
        self.config = config
        self.levels = levels
        self.model = model
        net = model.module if isinstance(model, DistributedDataParallel) else model
        candidates = [name for name, m in net.named_modules() if _quantizable(m)]
        if not candidates:
            raise ValueError(f"the model ({type(net).__name__}) has no quantizable layer (nn.Conv2d / nn.Linear)")
        excluded = _excluded_names(net, candidates, exclude)
        targets = [name for name in candidates if name not in excluded]
        if not targets:
            why = "" if exclude is not None else " (first and last layers are by default; exclude=[] keeps them)"
            raise ValueError(f"no layer left to quantize: {sorted(excluded)} excluded{why}")
        first = net.get_submodule(targets[0]).weight
        for name in targets:
            weight = net.get_submodule(name).weight.detach()
            if (weight.dtype, weight.device) != (first.dtype, first.device):
                raise ValueError(f"quantized weights must share one dtype and device: {name!r} is {weight.dtype} on "
                                 f"{weight.device}, {targets[0]!r} is {first.dtype} on {first.device}")
            if not weight.is_contiguous():
                raise ValueError(f"layer {name!r} has a non-contiguous weight (channels_last?): the fused constraint "
                                 "pass needs contiguous weights")
            if not torch.isfinite(weight).all():
                raise ValueError(f"layer {name!r} has NaN/Inf weights; nothing was changed")
            if not bool(weight.abs().sum() > 0):
                raise ValueError(f"layer {name!r} has all-zero weights (scale mean|W| = 0): exclude or initialise it")
        self._before_swap(net)
        self.layers: dict[str, QuantizedLayer] = {}
        for name in targets:  # layer_cls None: the layers are trained as they are (CQ)
            layer = net.get_submodule(name)
            if layer_cls is not None:
                layer = layer_cls.from_float(layer, self.levels)
                _swap(net, name, layer)
            self.layers[name] = layer
        self.net = net
        self.excluded = sorted(excluded)
        self.weights = [m.weight for m in self.layers.values()]
        self.num_weights = sum(w.numel() for w in self.weights)
        self.weight_optimizer = _build_weight_optimizer(self.config, self._param_groups())
        amp = getattr(self.config, "amp", None)
        # bf16 keeps float32's exponent range: a loss scale only for fp16
        self.scaler = torch.amp.GradScaler(first.device.type) if amp == "fp16" else None
        self.epoch = 0
        self.history: list[dict] = []
        self._reset_epoch_sums()

    # ---- the plain per-batch and per-epoch updates (CBP overrides both) ---------------------
    def step(self, loss: torch.Tensor) -> float:
        """One minibatch: backpropagate ``loss`` (0-dim, graph reaching the model), clip the
        gradients (``_clip_and_step``) and step the weight optimizer; returns the loss. A
        NaN/Inf loss raises FloatingPointError, nothing updated."""
        c = self._checked_loss(loss)
        self._backward(loss)
        self._clip_and_step()
        self._count(c, c)
        return c

    # ---- the pieces of a step, shared by the quantizers' ``step`` ----------------------------
    def _checked_loss(self, loss: torch.Tensor) -> float:
        c = float(loss.detach())
        if not math.isfinite(c):
            raise FloatingPointError(f"the loss is {c} at epoch {self.epoch}, batch {self._batch}; nothing was updated")
        return c

    def _backward(self, loss: torch.Tensor) -> None:
        """Zeroes the weight optimizer's gradients (only its own: with ``train_params=
        "quantized"`` the other layers' gradients accumulate, as in the authors' TSSL-BP code)
        and backpropagates; under fp16 ``amp`` through the GradScaler, then unscaled, so that
        every gradient is in the loss's own units afterwards."""
        self.weight_optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.weight_optimizer)
        else:
            loss.backward()

    def _clip_and_step(self) -> None:
        """Clips every gradient of the model (``config.clip``: by value or by total norm at
        ``grad_clip``; at grad_clip / S, S the loss scale, with ``amp_clip="scaled"``: the
        authors' clip of the scaled gradients, exact since S is a power of two), steps the
        weight optimizer (skipped by the GradScaler on Inf/NaN gradients) and clamps the other
        layers' weights to +-``other_weight_clip`` when the config has one."""
        cfg = self.config
        clip = getattr(cfg, "grad_clip", None)
        if clip is not None:
            if self.scaler is not None and getattr(cfg, "amp_clip", "unscaled") == "scaled":
                clip = clip / self.scaler.get_scale()
            params = [p for p in self.net.parameters() if p.grad is not None]
            if getattr(cfg, "clip", "value") == "norm":
                torch.nn.utils.clip_grad_norm_(params, clip)
            else:
                clip_grad_value(params, clip)
        if self.scaler is not None:
            self.scaler.step(self.weight_optimizer)
            self.scaler.update()
        else:
            self.weight_optimizer.step()
        other = getattr(cfg, "other_weight_clip", None)
        if other is not None:
            quantized = {id(w) for w in self.weights}
            with torch.no_grad():
                for m in self.net.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m.weight) not in quantized:
                        m.weight.clamp_(-other, other)

    def _count(self, L: float, c: float) -> None:
        self._L_sum += L
        self._loss_sum += c
        self._steps += 1
        self._batch += 1

    def end_epoch(self, L_sum: float | None = None) -> dict:
        """The epoch's record: ``epoch``, ``loss`` (mean), ``L_sum`` (default the loss sum),
        ``lr`` and the subclass's ``_epoch_record()``."""
        record = {"epoch": self.epoch, "loss": self._loss_sum / max(self._steps, 1),
                  "L_sum": self._L_sum if L_sum is None else float(L_sum),
                  "lr": self.weight_optimizer.param_groups[0]["lr"], **self._epoch_record()}
        self.epoch += 1
        self._reset_epoch_sums()
        self._start_epoch()
        return record

    # ---- hooks ------------------------------------------------------------------------------
    def _before_swap(self, net: nn.Module) -> None:
        """Runs on the validated float model just before its layers are swapped."""

    def _start_epoch(self) -> None:
        """Runs at the start of every epoch of ``fit`` (e.g. to set a temperature)."""

    def _epoch_record(self) -> dict:
        """Extra fields of the plain ``end_epoch``'s record."""
        return {}

    def _progress(self, L: float) -> dict:
        """Extra fields of the progress bar after a batch whose Lagrangian / loss was L."""
        return {"L": f"{L:.4g}"}

    def _level_units(self, layer: QuantizedLayer) -> torch.Tensor:
        """The layer's weights in units of the level set (for the histograms)."""
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors besides the parameters that must be finite to checkpoint."""
        return {}

    def _param_groups(self) -> list[dict]:
        """quantized weights | other conv/linear weights (both with weight decay) | biases
        (Algorithm 2 only: lr_bias, clamped) | everything else (no weight decay)."""
        layers = [m for m in self.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        quantized = {id(w) for w in self.weights}
        weights = [m.weight for m in layers if m.weight.requires_grad and id(m.weight) not in quantized]
        biases = [m.bias for m in layers if m.bias is not None and m.bias.requires_grad]
        biases = biases if getattr(self.config, "calibration", False) else []
        taken = quantized | {id(p) for p in weights + biases}
        others = [p for p in self.net.parameters() if p.requires_grad and id(p) not in taken]
        wd = self.config.weight_decay
        if getattr(self.config, "train_params", "all") == "quantized":
            return [{"params": self.weights, "name": "quantized", "weight_decay": wd}]
        groups = [{"params": self.weights, "name": "quantized", "weight_decay": wd},
                  {"params": weights, "name": "weight", "weight_decay": wd},
                  {"params": biases, "name": "bias", "weight_decay": 0.0, "lr": getattr(self.config, "lr_bias", None) or self.config.lr},
                  {"params": others, "name": "other", "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def _reset_epoch_sums(self) -> None:
        self._L_sum, self._loss_sum, self._steps, self._batch = 0.0, 0.0, 0, 0

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self, train_loader, loss_fn: Callable, epochs: int | None = None, forward_fn: Callable | None = None,
            eval_fn: Callable | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
            checkpoint_every: int = 0, progress: bool = True, reset_state: bool = True,
            on_epoch_end: Callable[[dict], None] | None = None) -> list[dict]:
        """Trains until ``epochs`` epochs are done in total (``step`` per batch, ``end_epoch`` per epoch).

        Args:
            train_loader: an iterable of ``(inputs, target)`` batches, re-iterable once per
                epoch (a DataLoader). Its order is seeded per epoch (``config.seed + epoch``),
                so a resumed run sees the same batches.
            loss_fn: ``loss_fn(output, target) -> 0-dim tensor`` (any loss: cross-entropy on
                rates, MSE on spike counts, van Rossum distance, ...).
            epochs: the total epoch count (default ``config.epochs``).
            forward_fn: ``forward_fn(model, inputs) -> output`` (e.g. repeat over T steps and
                average); default ``model(inputs)``.
            eval_fn: ``eval_fn(model) -> float | dict`` after each epoch; a float is recorded
                as ``accuracy``, a dict is merged into the record.
            checkpoint_dir: where ``last.pt`` is written atomically after every epoch (rank 0
                only under torch.distributed).
            checkpoint_every: also checkpoint every this many batches (0: at epoch ends only).
            resume: continue from ``checkpoint_dir/last.pt`` if it exists (bit-identical to an
                uninterrupted run, even when resumed mid-epoch).
            progress: show a tqdm bar (loss, L, CFS, g) on rank 0.
            reset_state: call ``reset()`` on every module that has one (SpikingJelly's
                memory modules, cbp_kernels neurons) before each batch.
            on_epoch_end: called with each epoch's record once it is in the history and
                checkpointed (e.g. to write metrics at the epoch's end).

        Returns the history: one record per epoch (see ``end_epoch``) plus ``eval_fn``'s
        results and ``weight_hist`` (counts of W/s over ``hist_range``, ``HIST_BINS`` bins).

        Raises FloatingPointError on a NaN/Inf loss or weight (the last checkpoint is intact).
        """
        epochs = self.config.epochs if epochs is None else epochs
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        saved_rng = None
        if resume:
            if path is None:
                raise ValueError("resume=True needs a checkpoint_dir")
            if path.exists():
                saved_rng = self.load_checkpoint(path)
        device = self.weights[0].device
        rank0 = not _distributed() or dist.get_rank() == 0
        resettable = [m for m in self.model.modules() if callable(getattr(m, "reset", None))] if reset_state else []
        t_train = getattr(self.config, "timesteps_train", None)
        if t_train is not None:
            from ..data.dvs import sample_frames
        while self.epoch < epochs:
            _seed_epoch(train_loader, self.config.seed, self.epoch)
            self._start_epoch()
            self.model.train()
            batches = iter(train_loader)
            for _ in range(self._batch):  # mid-epoch resume: skip what was done, then restore the RNGs
                next(batches)
            if saved_rng is not None:
                set_rng_state(saved_rng)
                saved_rng = None
            total = len(train_loader) if hasattr(train_loader, "__len__") else None
            bar = tqdm(total=total, initial=self._batch, desc=f"epoch {self.epoch + 1}/{epochs}",
                       disable=not (progress and rank0), leave=False)
            for inputs, target in batches:
                inputs, target = _to_device(inputs, device), _to_device(target, device)
                if t_train is not None:
                    inputs = sample_frames(inputs, t_train)
                for m in resettable:
                    m.reset()
                with _autocast(self.config, device):
                    output = forward_fn(self.model, inputs) if forward_fn is not None else self.model(inputs)
                    loss = loss_fn(output, target)
                try:
                    L = self.step(loss)
                except FloatingPointError as err:
                    where = f"; the last checkpoint {path} is intact" if path is not None and path.exists() else ""
                    raise FloatingPointError(f"CBP stopped: {err}{where}") from err
                bar.update(1)
                bar.set_postfix(loss=f"{self._loss_sum / self._steps:.4g}", **self._progress(L))
                if checkpoint_every and self._batch % checkpoint_every == 0:
                    self.save_checkpoint(path)
            bar.close()
            record = self.end_epoch()
            if eval_fn is not None:
                result = eval_fn(self.model)
                record.update(result if isinstance(result, dict) else {"accuracy": float(result)})
                self.model.train()
            record["hist_range"], record["weight_hist"] = self.weight_histogram()
            self.history.append(record)
            if rank0 and progress:
                tqdm.write(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in record.items() if k not in ("weight_hist", "hist_range")))
            if path is not None:
                self.save_checkpoint(path)
            if on_epoch_end is not None:
                on_epoch_end(record)
        return self.history

    @torch.no_grad()
    def weight_histogram(self) -> tuple[tuple[float, float], list[float]]:
        """Counts of the quantized layers' weights in level units (``_level_units``), all
        layers, in ``HIST_BINS`` bins over (min level - span/4, max level + span/4)."""
        lo, hi = float(self.levels[0]), float(self.levels[-1])
        pad = (hi - lo) / 4
        rng = (lo - pad, hi + pad)
        counts = sum(torch.histc(self._level_units(layer).float().flatten(), HIST_BINS, *rng).cpu()
                     for layer in self.layers.values())
        return rng, [float(c) for c in counts]

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs: model, weight optimizer, epoch, batch position and
        sums within the epoch, history, RNG states and the quantizer's own (``_extra_state``)."""
        return {
            "model": self.net.state_dict(), "weight_optimizer": self.weight_optimizer.state_dict(),
            "epoch": self.epoch, "batch": self._batch, "sums": [self._L_sum, self._loss_sum, self._steps],
            "history": self.history, "layers": list(self.layers), "levels": self.levels.tolist(),
            "config": dataclasses.asdict(self.config), "rng": rng_state(), **self._extra_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "frozen_grads": self._frozen_grads(),
        }

    def _frozen_grads(self) -> dict[str, torch.Tensor]:
        """Gradients of parameters the optimizer does not zero (``train_params="quantized"``):
        they accumulate over steps (as in the authors' code) and count in a norm clip, so a
        resumed run needs them."""
        trained = {id(p) for group in self.weight_optimizer.param_groups for p in group["params"]}
        return {n: p.grad.detach().clone() for n, p in self.net.named_parameters()
                if p.grad is not None and id(p) not in trained}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``'s output (same model, levels and quantized layers);
        the RNG states are returned by ``load_checkpoint``, not applied."""
        if state["layers"] != list(self.layers) or state["levels"] != self.levels.tolist():
            raise ValueError(
                f"checkpoint is of other quantized layers or levels: {state['layers']} {state['levels']} vs "
                f"{list(self.layers)} {self.levels.tolist()}"
            )
        self.net.load_state_dict(state["model"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        params = dict(self.net.named_parameters())
        for name, grad in state.get("frozen_grads", {}).items():
            params[name].grad = grad.to(params[name].device)
        self._load_extra_state(state)
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._L_sum, self._loss_sum, self._steps = state["sums"]
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | Path) -> Path:
        """Writes ``state_dict()`` atomically (rank 0 only under torch.distributed). Refuses
        (FloatingPointError) if a parameter or multiplier is NaN/Inf, keeping the old file."""
        named = list(self.net.named_parameters()) + list(self._extra_tensors().items())
        bad = [n for n, p in named if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(f"not checkpointing non-finite values in {bad[:5]}; {path} is left as it was")
        if _distributed() and dist.get_rank() != 0:
            return Path(path)
        return save_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: str | Path) -> dict:
        """Loads a checkpoint into this quantizer; returns its RNG states (``fit`` restores
        them once it has repositioned the data)."""
        state = load_checkpoint(path, map_location=self.weights[0].device)
        self.load_state_dict(state)
        return state["rng"]

