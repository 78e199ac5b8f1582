"""CBPQuantizer: constrained backpropagation (paper section 3.1, Algorithms 1 and 2).

The Lagrangian of a batch is L = C + sum_i lambda_i * cs(w_i; g), C being any loss. Weights
descend on L every batch; at the end of every epoch the window parameter g and the
multipliers lambda are updated when L_sum (the epoch's sum of L) did not fall or after
``p_max`` epochs without an update:

    p += 1
    if L_sum >= L_pre or p == p_max:
        g += 1 if g < 10 else 10          (lr x lr_drop_factor when g reaches lr_drop_g)
        lambda <- one gradient-ASCENT step of the multiplier optimizer on sum(lambda * cs(W; g))
        L_pre = 1e10; p = 0
    else:
        L_pre = L_sum

with one such lambda update (g unchanged) before the first epoch.

Typical use::

    q = CBPQuantizer(model, levels="ternary", preset="sew-resnet/imagenet")
    history = q.fit(train_loader, torch.nn.functional.cross_entropy, epochs=100,
                    forward_fn=lambda m, x: m(x).mean(0), eval_fn=evaluate,
                    checkpoint_dir="runs/cbp", resume=True)
    model, export = q.finalize()

or by hand, with the two hooks: ``L = q.step(loss)`` per batch, ``q.end_epoch()`` per epoch.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..nn.quantized import QuantizedLayer
from ..ops import constraint_pass
from ..ops.constraint.reference import level_table
from .calibration import rescale_thresholds, threshold_pairs
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import CBPConfig, get_preset
from .levels import resolve_levels

__all__ = ["CBPQuantizer", "WindowSchedule", "next_g", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"
# Bins of the per-epoch histogram of W / s (the unscaled weights) kept in the history.
HIST_BINS = 101


def next_g(g: int) -> int:
    """g + 1 below 10, g + 10 from 10 on (paper: Delta g = 1 if g < 10, 10 if g >= 10)."""
    return g + 1 if g < 10 else g + 10


class WindowSchedule:
    """The epoch-end decision of Algorithm 1: state g, p, L_pre (``L_PRE_MAX`` = 1e10)."""

    L_PRE_MAX = 1e10

    def __init__(self, p_max: int = 20, g: int = 1):
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ValueError(f"g must be an integer >= 1, got {g!r}")
        if not isinstance(p_max, int) or isinstance(p_max, bool) or p_max < 1:
            raise ValueError(f"p_max must be an integer >= 1, got {p_max!r}")
        self.p_max, self.g, self.p, self.L_pre = p_max, g, 0, self.L_PRE_MAX

    def end_epoch(self, L_sum: float) -> bool:
        """Takes the epoch's L_sum; returns True when g (and so lambda) is updated."""
        self.p += 1
        if L_sum >= self.L_pre or self.p == self.p_max:
            self.g = next_g(self.g)
            self.L_pre, self.p = self.L_PRE_MAX, 0
            return True
        self.L_pre = L_sum
        return False

    def state_dict(self) -> dict:
        return {"g": self.g, "p": self.p, "L_pre": self.L_pre, "p_max": self.p_max}

    def load_state_dict(self, state: dict) -> None:
        self.g, self.p, self.p_max = int(state["g"]), int(state["p"]), int(state["p_max"])
        self.L_pre = float(state["L_pre"])


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


def _swap(net: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)


def _build_weight_optimizer(config: CBPConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=config.lr)


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


class CBPQuantizer:
    """Quantizes a model's weights onto a level set by constrained backpropagation.

    Construction swaps, IN PLACE, every quantizable layer (``nn.Conv2d`` / ``nn.Linear``,
    subclasses included) except the excluded ones for its quantized twin
    (``cbp_kernels.nn.QuantConv2d`` / ``QuantLinear``: same Parameter objects, buffers
    ``levels`` and ``weight_scale`` = mean(|W|) now), creates lambda (one per quantized
    weight, 0), g = ``config.g``, p = 0, L_pre = 1e10, the weight optimizer (over every
    trainable parameter of the model) and the multiplier optimizer, and makes the one
    lambda update that precedes the first epoch.

    Args:
        model: the pre-trained model; may be wrapped in ``DistributedDataParallel`` (build
            the quantizer after wrapping, or wrap after: the Parameters are the same).
        levels: ``"binary"``, ``"ternary"`` or a sorted list of distinct numbers (unscaled).
        preset: a key of ``PRESETS`` (Table 4); mutually exclusive with ``config``.
        exclude: module names whose quantizable layers stay in float; None = the first and
            the last quantizable layer (in module order); ``[]`` quantizes every layer.
        config: a ``CBPConfig``; None and no preset: ``CBPConfig()``.
        backend: the backend of the constraint pass and of the quantize op.

    Move the model to its device (and dtype) first: lambda and the level set are created
    beside the weights. The quantized weights must be contiguous and share one dtype/device.

    Raises:
        ValueError / TypeError: bad levels, unknown preset, preset and config both given,
            an excluded name that is not a module or holds no quantizable layer, a model
            with no quantizable layer or none left after exclusion, NaN/Inf or all-zero
            weights; the model is left unchanged.
    """

    def __init__(self, model: nn.Module, levels: str | Sequence[float] = "binary", preset: str | None = None,
                 exclude: Iterable[str] | None = None, config: CBPConfig | None = None, backend: str = "auto"):
        if preset is not None and config is not None:
            raise ValueError("give preset or config, not both (change a preset with dataclasses.replace)")
        if config is not None and not isinstance(config, CBPConfig):
            raise TypeError(f"config must be a CBPConfig, got {type(config).__name__}")
        self.config = get_preset(preset) if preset is not None else (config or CBPConfig())
        self.levels = resolve_levels(levels)
        self.backend = backend
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
        if self.config.calibration:
            rescale_thresholds(threshold_pairs(net))
        self.layers: dict[str, QuantizedLayer] = {}
        for name in targets:
            layer = net.get_submodule(name)
            qlayer = QuantizedLayer.from_float(layer, self.levels)
            qlayer.quant_backend = backend
            _swap(net, name, qlayer)
            self.layers[name] = qlayer
        self.net = net
        self.excluded = sorted(excluded)
        self.weights = [m.weight for m in self.layers.values()]
        self.num_weights = sum(w.numel() for w in self.weights)
        self._levels_dev = self.levels.to(self.weights[0].device)
        self.lambdas = [torch.zeros_like(w, memory_format=torch.contiguous_format).detach() for w in self.weights]
        for lam in self.lambdas:
            lam.grad = torch.zeros_like(lam)
        self.schedule = WindowSchedule(self.config.p_max, self.config.g)
        self.weight_optimizer = _build_weight_optimizer(self.config, self._param_groups())
        mcls = torch.optim.Adam if self.config.multiplier_optimizer == "adam" else torch.optim.AdamW
        self.multiplier_optimizer = mcls(self.lambdas, lr=self.config.lr_multiplier, maximize=True)
        self.epoch = 0
        self.history: list[dict] = []
        self._reset_epoch_sums()
        self._last_cfs = float("nan")
        self._update_multipliers()

    # ---- state --------------------------------------------------------------------------
    @property
    def g(self) -> int:
        """The window parameter g (>= 1, never decreases)."""
        return self.schedule.g

    @property
    def p(self) -> int:
        """Epochs since the last g / lambda update."""
        return self.schedule.p

    @property
    def L_pre(self) -> float:
        """L_sum of the previous epoch (1e10 right after an update)."""
        return self.schedule.L_pre

    @property
    def scales(self) -> list[torch.Tensor]:
        """The per-layer scales s (0-dim float32), in ``self.layers`` order."""
        return [m.weight_scale for m in self.layers.values()]

    def _param_groups(self) -> list[dict]:
        """quantized weights | other conv/linear weights (both with weight decay) | biases
        (Algorithm 2 only: lr_bias, clamped) | everything else (no weight decay)."""
        layers = [m for m in self.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        quantized = {id(w) for w in self.weights}
        weights = [m.weight for m in layers if m.weight.requires_grad and id(m.weight) not in quantized]
        biases = [m.bias for m in layers if m.bias is not None and m.bias.requires_grad]
        biases = biases if self.config.calibration else []
        taken = quantized | {id(p) for p in weights + biases}
        others = [p for p in self.net.parameters() if p.requires_grad and id(p) not in taken]
        wd = self.config.weight_decay
        groups = [{"params": self.weights, "name": "quantized", "weight_decay": wd},
                  {"params": weights, "name": "weight", "weight_decay": wd},
                  {"params": biases, "name": "bias", "weight_decay": 0.0, "lr": self.config.lr_bias or self.config.lr},
                  {"params": others, "name": "other", "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def _reset_epoch_sums(self) -> None:
        self._L_sum, self._loss_sum, self._steps, self._batch = 0.0, 0.0, 0, 0

    def _pass(self, **kw) -> tuple[float, float]:
        """One fused constraint pass over all quantized weights at the current g:
        (sum lambda * cs(W; g), sum of windowless cs)."""
        penalty, cs_sum = constraint_pass(self.weights, self.lambdas, self._levels_dev, torch.stack(self.scales),
                                          float(self.g), backend=self.backend, **kw)
        return float(penalty), float(cs_sum)

    def _update_multipliers(self) -> None:
        """One gradient-ascent step of the multiplier optimizer with dL/dlambda = cs(W; g)."""
        self._pass(lambda_grads=[lam.grad for lam in self.lambdas])
        self.multiplier_optimizer.step()

    def cfs(self) -> float:
        """The constraint-function sum per weight: mean of the windowless cs over all
        quantized weights (0 exactly when every weight sits on a level)."""
        return self._pass()[1] / self.num_weights

    # ---- Algorithm 1 hooks ------------------------------------------------------------------
    def step(self, loss: torch.Tensor) -> float:
        """One minibatch of Algorithm 1.

        ``loss`` is the batch's loss C (a 0-dim tensor whose graph reaches the model, not yet
        backpropagated). Zeroes the gradients, backpropagates C, adds lambda * dcs/dW to the
        quantized weights' gradients (one fused pass), clips every gradient by value at
        ``config.grad_clip``, steps the weight optimizer, clamps the quantized weights to
        [-weight_clip, weight_clip] (and, with ``calibration``, the biases to +-bias_clip).
        Returns L = C + sum(lambda * cs(W; g)) (of the weights before the step) and adds it
        to the epoch's L_sum. A NaN/Inf loss or weight raises FloatingPointError before any
        parameter changes."""
        c = float(loss.detach())
        if not math.isfinite(c):
            raise FloatingPointError(f"the loss is {c} at epoch {self.epoch}, batch {self._batch}; nothing was updated")
        self.weight_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for w in self.weights:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
        penalty, cs_sum = self._pass(grads=[w.grad for w in self.weights])
        if not (math.isfinite(penalty) and math.isfinite(cs_sum)):
            raise FloatingPointError(
                f"the quantized weights or multipliers hold NaN/Inf at epoch {self.epoch}, batch {self._batch} "
                f"(sum lambda*cs = {penalty}, sum cs = {cs_sum}); nothing was updated"
            )
        params = [p for group in self.weight_optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_value_(params, self.config.grad_clip)
        self.weight_optimizer.step()
        with torch.no_grad():
            for w in self.weights:
                w.clamp_(-self.config.weight_clip, self.config.weight_clip)
            for group in self.weight_optimizer.param_groups:
                if group.get("name") == "bias":
                    for b in group["params"]:
                        b.clamp_(-self.config.bias_clip, self.config.bias_clip)
        L = c + penalty
        self._L_sum += L
        self._loss_sum += c
        self._steps += 1
        self._batch += 1
        self._last_cfs = cs_sum / self.num_weights
        return L

    def end_epoch(self, L_sum: float | None = None) -> dict:
        """The epoch-end update of Algorithm 1 (see the module docstring).

        ``L_sum``: the epoch's sum of L; default the sum of what ``step`` returned this epoch.
        Under torch.distributed it is summed over the ranks first (all_reduce, as the CBP
        authors' code), so that every rank takes the same decision. Returns the epoch's
        record: ``epoch``, ``loss`` (mean C), ``L_sum``, ``updated`` (g/lambda updated), ``g``
        (after the update), ``p``, ``lr`` (of the quantized weights), ``cfs``."""
        L_sum = self._L_sum if L_sum is None else float(L_sum)
        if not math.isfinite(L_sum):
            raise FloatingPointError(f"L_sum is {L_sum} at the end of epoch {self.epoch}; nothing was updated")
        if _distributed():
            t = torch.tensor([L_sum], dtype=torch.float64, device=self.weights[0].device)
            dist.all_reduce(t)
            L_sum = float(t)
        g_before = self.g
        updated = self.schedule.end_epoch(L_sum)
        if updated:
            drop = self.config.lr_drop_g
            if drop is not None and g_before < drop <= self.g:
                for group in self.weight_optimizer.param_groups:
                    group["lr"] *= self.config.lr_drop_factor
            self._update_multipliers()
        record = {
            "epoch": self.epoch, "loss": self._loss_sum / max(self._steps, 1), "L_sum": L_sum, "updated": updated,
            "g": self.g, "p": self.p, "lr": self.weight_optimizer.param_groups[0]["lr"], "cfs": self.cfs(),
        }
        self.epoch += 1
        self._reset_epoch_sums()
        return record

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self, train_loader, loss_fn: Callable, epochs: int | None = None, forward_fn: Callable | None = None,
            eval_fn: Callable | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False,
            checkpoint_every: int = 0, progress: bool = True, reset_state: bool = True) -> list[dict]:
        """Runs Algorithm 1 (or 2) until ``epochs`` epochs are done in total.

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
        while self.epoch < epochs:
            _seed_epoch(train_loader, self.config.seed, self.epoch)
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
                for m in resettable:
                    m.reset()
                output = forward_fn(self.model, inputs) if forward_fn is not None else self.model(inputs)
                try:
                    L = self.step(loss_fn(output, target))
                except FloatingPointError as err:
                    where = f"; the last checkpoint {path} is intact" if path is not None and path.exists() else ""
                    raise FloatingPointError(f"CBP stopped: {err}{where}") from err
                bar.update(1)
                bar.set_postfix(loss=f"{self._loss_sum / self._steps:.4g}", L=f"{L:.4g}",
                                CFS=f"{self._last_cfs:.3g}", g=self.g)
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
        return self.history

    @torch.no_grad()
    def weight_histogram(self) -> tuple[tuple[float, float], list[float]]:
        """Counts of W/s (the unscaled quantized weights, all layers) in ``HIST_BINS`` bins
        over (min level - span/4, max level + span/4)."""
        lo, hi = float(self.levels[0]), float(self.levels[-1])
        pad = (hi - lo) / 4
        rng = (lo - pad, hi + pad)
        counts = sum(torch.histc((w.float() / s).flatten(), HIST_BINS, *rng).cpu()
                     for w, s in zip(self.weights, self.scales))
        return rng, [float(c) for c in counts]

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs: model, lambda, schedule, both optimizers, epoch,
        batch position and sums within the epoch, history and RNG states."""
        return {
            "model": self.net.state_dict(), "lambdas": [lam.detach().clone() for lam in self.lambdas],
            "schedule": self.schedule.state_dict(), "weight_optimizer": self.weight_optimizer.state_dict(),
            "multiplier_optimizer": self.multiplier_optimizer.state_dict(), "epoch": self.epoch,
            "batch": self._batch, "sums": [self._L_sum, self._loss_sum, self._steps], "history": self.history,
            "layers": list(self.layers), "levels": self.levels.tolist(), "config": dataclasses.asdict(self.config),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``'s output (same model, levels and quantized layers);
        the RNG states are returned by ``load_checkpoint``, not applied."""
        if state["layers"] != list(self.layers) or state["levels"] != self.levels.tolist():
            raise ValueError(
                f"checkpoint is of other quantized layers or levels: {state['layers']} {state['levels']} vs "
                f"{list(self.layers)} {self.levels.tolist()}"
            )
        self.net.load_state_dict(state["model"])
        with torch.no_grad():
            for lam, saved in zip(self.lambdas, state["lambdas"]):
                lam.copy_(saved)
        self.schedule.load_state_dict(state["schedule"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.multiplier_optimizer.load_state_dict(state["multiplier_optimizer"])
        self.epoch, self._batch = int(state["epoch"]), int(state["batch"])
        self._L_sum, self._loss_sum, self._steps = state["sums"]
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | Path) -> Path:
        """Writes ``state_dict()`` atomically (rank 0 only under torch.distributed). Refuses
        (FloatingPointError) if a parameter or multiplier is NaN/Inf, keeping the old file."""
        bad = [n for n, p in self.net.named_parameters() if not torch.isfinite(p).all()]
        bad += [f"lambda[{i}]" for i, lam in enumerate(self.lambdas) if not torch.isfinite(lam).all()]
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

    # ---- the result -------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> tuple[nn.Module, dict[str, dict]]:
        """Forces every quantized weight onto its level (W <- Q(W), so CFS = 0) and exports.

        Returns ``(model, export)`` where ``export[layer_name] = {"codes": int8 tensor of level
        indices (shape of the weight), "scale": float, "levels": list of floats}``; the
        weights equal ``levels[codes] * scale``."""
        export = {}
        for name, layer in self.layers.items():
            layer.weight.copy_(layer.quantized_weight().detach())
            # code k = #{j : w >= m_j}, the midpoints m_j of the quantize op's own table
            mids = level_table(layer.levels, layer.weight_scale.reshape(1), 1.0)[0, 1, :-1]
            codes = torch.bucketize(layer.weight.detach().float(), mids, right=True).to(torch.int8)
            export[name] = {"codes": codes.cpu(), "scale": float(layer.weight_scale), "levels": layer.levels.tolist()}
        return self.model, export
