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

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..nn.integer_forward import check_input_max, takes_integer_forward
from ..nn.quantized import QuantizedLayer
from ..ops import constraint_pass, multiplier_step
from ..ops.levels import resolve_levels
from .calibration import rescale_thresholds, threshold_pairs
from .config import CBPConfig, get_preset
from .trainer import CHECKPOINT_NAME, QuantTrainer, _distributed, weight_export

__all__ = ["CBPQuantizer", "WindowSchedule", "next_g", "CHECKPOINT_NAME"]

# The multiplier optimizer's weight decay: torch.optim.Adam's and AdamW's defaults (L2 0 for
# Adam; decoupled 1e-2 for AdamW), with their default betas (0.9, 0.999) and eps 1e-8.
MULTIPLIER_WEIGHT_DECAY = {"adam": 0.0, "adamw": 1e-2}
# ``finalize``: a weight farther than this fraction of its layer's level step from its level
# counts as moved by forcing (1 %: a weight that training had not yet brought onto its level).
FORCE_TOLERANCE = 0.01


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


class CBPQuantizer(QuantTrainer):
    """Quantizes a model's weights onto a level set by constrained backpropagation.

    Construction swaps, IN PLACE, every quantizable layer (``nn.Conv2d`` / ``nn.Linear``,
    subclasses included) except the excluded ones for its quantized twin
    (``cbp_kernels.nn.QuantConv2d`` / ``QuantLinear``: same Parameter objects, buffers
    ``levels`` and ``weight_scale`` = mean(|W|) now), creates lambda (one per quantized
    weight, 0), g = ``config.g``, p = 0, L_pre = 1e10, the weight optimizer (``config.train_params``: every
    trainable parameter of the model, or the quantized weights only) and the multiplier optimizer's state (Adam moments
    ``exp_avgs`` / ``exp_avg_sqs`` beside lambda, and ``multiplier_steps``), and makes the
    one lambda update that precedes the first epoch. Quantized layers that read integers
    (declared by the model: ``input_max``) compute their forward exactly on the integer units
    where that is faster (``config.integer_forward``; ``integer_layers`` names them).

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
        config = get_preset(preset) if preset is not None else (config or CBPConfig())
        self.backend = backend
        super().__init__(model, resolve_levels(levels), exclude, config, QuantizedLayer)
        for layer in self.layers.values():
            layer.quant_backend = backend
            layer.integer_forward = self.config.integer_forward
        self._levels_dev = self.levels.to(self.weights[0].device)
        self.lambdas = [torch.zeros_like(w, memory_format=torch.contiguous_format).detach() for w in self.weights]
        self.exp_avgs = [torch.zeros_like(lam) for lam in self.lambdas]
        self.exp_avg_sqs = [torch.zeros_like(lam) for lam in self.lambdas]
        self.multiplier_steps = 0
        self.schedule = WindowSchedule(self.config.p_max, self.config.g)
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
    def integer_layers(self) -> list[str]:
        """The quantized layers whose forward runs on the integer units
        (``config.integer_forward``, an ``input_max`` declared by the model, binary / ternary
        levels and, with ``integer_forward=True``, a shape on which it is the faster forward;
        see ``cbp_kernels.nn.integer_forward``); the others compute in float32."""
        return [name for name, m in self.layers.items() if takes_integer_forward(m)]

    @property
    def scales(self) -> list[torch.Tensor]:
        """The per-layer scales s (0-dim float32), in ``self.layers`` order."""
        return [m.weight_scale for m in self.layers.values()]

    def _pass(self, **kw) -> tuple[float, float]:
        """One fused constraint pass over all quantized weights at the current g:
        (sum lambda * cs(W; g), sum of windowless cs)."""
        penalty, cs_sum = constraint_pass(self.weights, self.lambdas, self._levels_dev, torch.stack(self.scales),
                                          float(self.g), backend=self.backend, **kw)
        return float(penalty), float(cs_sum)

    def _update_multipliers(self) -> None:
        """One gradient-ascent step of the multiplier optimizer (``config.multiplier_optimizer``:
        Adam or AdamW, maximize=True) with dL/dlambda = cs(W; g): one fused pass
        (``ops.multiplier_step``) over lambda and its Adam moments."""
        name = self.config.multiplier_optimizer
        multiplier_step(self.weights, self.lambdas, self.exp_avgs, self.exp_avg_sqs, self._levels_dev,
                        torch.stack(self.scales), float(self.g), step=self.multiplier_steps + 1,
                        lr=self.config.lr_multiplier, weight_decay=MULTIPLIER_WEIGHT_DECAY[name],
                        decoupled=name == "adamw", backend=self.backend)
        self.multiplier_steps += 1

    def cfs(self) -> float:
        """The constraint-function sum per weight: mean of the windowless cs over all
        quantized weights (0 exactly when every weight sits on a level)."""
        return self._pass()[1] / self.num_weights

    # ---- Algorithm 1 hooks ------------------------------------------------------------------
    def step(self, loss: torch.Tensor) -> float:
        """One minibatch of Algorithm 1.

        ``loss`` is the batch's loss C (a 0-dim tensor whose graph reaches the model, not yet
        backpropagated; under ``amp`` computed in autocast). Zeroes the gradients,
        backpropagates C (through the GradScaler under fp16 amp, then unscaled), adds
        lambda * dcs/dW to the quantized weights' float32 gradients (one fused pass), clips
        (``config.clip`` at ``grad_clip``), steps the weight optimizer, clamps the quantized
        weights to [-weight_clip, weight_clip] (and the other layers' to +-other_weight_clip,
        the biases to +-bias_clip, when set). Returns L = C + sum(lambda * cs(W; g)) (of the
        weights before the step) and adds it to the epoch's L_sum. A NaN/Inf loss or weight
        raises FloatingPointError before any parameter changes."""
        c = self._checked_loss(loss)
        self._backward(loss)
        for w in self.weights:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
        penalty, cs_sum = self._pass(grads=[w.grad for w in self.weights])
        if not (math.isfinite(penalty) and math.isfinite(cs_sum)):
            raise FloatingPointError(
                f"the quantized weights or multipliers hold NaN/Inf at epoch {self.epoch}, batch {self._batch} "
                f"(sum lambda*cs = {penalty}, sum cs = {cs_sum}); nothing was updated"
            )
        self._clip_and_step()
        with torch.no_grad():
            for w in self.weights:
                w.clamp_(-self.config.weight_clip, self.config.weight_clip)
            if self.config.bias_clip is not None:
                for group in self.weight_optimizer.param_groups:
                    if group.get("name") == "bias":
                        for b in group["params"]:
                            b.clamp_(-self.config.bias_clip, self.config.bias_clip)
        L = c + penalty
        self._count(L, c)
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

    # ---- the quantizer's own state in checkpoints ------------------------------------------
    def _extra_state(self) -> dict:
        return {"lambdas": [lam.detach().clone() for lam in self.lambdas], "schedule": self.schedule.state_dict(),
                "multiplier_state": {"step": self.multiplier_steps,
                                     "exp_avg": [m.detach().clone() for m in self.exp_avgs],
                                     "exp_avg_sq": [v.detach().clone() for v in self.exp_avg_sqs]}}

    def _load_extra_state(self, state: dict) -> None:
        moments = state["multiplier_state"]
        with torch.no_grad():
            for mine, saved in zip(self.lambdas + self.exp_avgs + self.exp_avg_sqs,
                                   state["lambdas"] + moments["exp_avg"] + moments["exp_avg_sq"]):
                mine.copy_(saved)
        self.schedule.load_state_dict(state["schedule"])
        self.multiplier_steps = int(moments["step"])

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}[{i}]": t for name, ts in (("lambda", self.lambdas), ("exp_avg", self.exp_avgs),
                                                    ("exp_avg_sq", self.exp_avg_sqs)) for i, t in enumerate(ts)}

    def _progress(self, L: float) -> dict:
        return {"L": f"{L:.4g}", "CFS": f"{self._last_cfs:.3g}", "g": self.g}

    def _level_units(self, layer) -> torch.Tensor:
        return layer.weight / layer.weight_scale

    def _before_swap(self, net: nn.Module) -> None:
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                check_input_max(getattr(m, "input_max", None), f"layer {name!r}: input_max")
        if self.config.calibration:
            rescale_thresholds(threshold_pairs(net), spiking_only=self.config.rescale_layers == "spiking")

    # ---- the result -------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> tuple[nn.Module, dict[str, dict]]:
        """Forces every quantized weight onto its level (W <- Q(W), so CFS = 0) and exports.

        Returns ``(model, export)`` where ``export[layer_name] = {"codes": int8 tensor of level
        indices (shape of the weight), "scale": float, "levels": list of floats}``; the
        weights equal ``levels[codes] * scale``. Records what forcing did: ``cfs_before``
        (the CFS reached by training) and ``forced_fraction``, the fraction of the quantized
        weights it moved by more than ``FORCE_TOLERANCE`` of their layer's smallest level step
        (s * min(q_{j+1} - q_j)); forcing never changes a weight's level, so not the forward."""
        export = {}
        self.cfs_before = self.cfs()
        moved = 0
        for name, layer in self.layers.items():
            q = layer.quantized_weight().detach()
            step = float((layer.levels[1:] - layer.levels[:-1]).min()) * float(layer.weight_scale)
            moved += int(((layer.weight.detach() - q).abs() > FORCE_TOLERANCE * step).sum())
            layer.weight.copy_(q)
            export[name] = weight_export(layer)
        self.forced_fraction = moved / self.num_weights
        return self.model, export
