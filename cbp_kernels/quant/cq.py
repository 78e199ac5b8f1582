"""CQ training and ANN-to-SNN conversion (seed paper 003: Yan, Zhou & Wong, AAAI 2021), the
conversion peer of CBP.

1. Train an ANN whose activations are clamped to [0, 1] and quantized to T levels,
   a = floor(clamp(x, 0, 1) * T) / T, with a straight-through gradient clipped twice: the
   clamp's (0 outside [0, 1]) and hardtanh of the incoming gradient (to [-1, 1]), as the
   authors' ``Clamp_q`` / ``Quantization.backward`` (zhoujuncc1/shenjingcat@068f967,
   src/cq.py): ``cbp_kernels.nn.ClampQuantize`` (a layer, re-exported here).
2. Fuse each BatchNorm into the convolution / linear layer before it (exact): ``fuse_bn``.
3. Convert: the same weights drive integrate-and-fire neurons (no leak, reset by
   subtraction) for T steps; each layer's weights and bias are divided by
   max(max|W|, max|b|) and its threshold by the same factor, so spikes are unchanged, and
   with ``weight_bits`` both weights and biases are rounded to n-bit fixed point (the
   authors' ``normalize_weight``, src/transfer.py): ``to_snn``, ``fixed_point``.
4. The SNN's input is the image IF-encoded into spikes (threshold 1, reset by subtraction:
   their ``SpikeDataset(type="spike")``, src/cat.py) and its output the last layer's spike
   count / T; ``input_encoding="current"`` / ``readout="potential"`` keep the analog input
   current and the accumulated potential instead.
The converted ``CQSpikingNet`` is a natural input for CBP's Algorithm 2 path.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from ..nn.bn_neuron import fold_batch_norm
from ..nn.clamp_quantize import ClampQuantize
from ..ops import multistep_neuron
from .trainer import QuantTrainer

__all__ = ["ClampQuantize", "fuse_bn", "fixed_point", "to_snn", "CQSpikingNet", "CQConfig", "CQTrainer"]


def fuse_bn(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> nn.Conv2d | nn.Linear:
    """A copy of ``layer`` with the eval-mode ``bn`` after it folded in:
    W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta."""
    if layer.weight.shape[0] != bn.num_features:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the layer has {layer.weight.shape[0]} outputs")
    fused = copy.deepcopy(layer)
    with torch.no_grad():
        gain, shift = fold_batch_norm(bn, layer.bias)
        fused.weight.copy_(layer.weight * gain.view(-1, *([1] * (layer.weight.dim() - 1))))
        fused.bias = nn.Parameter(shift)
    return fused


def fixed_point(w: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w * 2^(bits-1)) / 2^(bits-1): n-bit fixed point of weights in [-1, 1]."""
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an int >= 2, got {bits!r}")
    scale = 2.0 ** (bits - 1)
    return torch.round(w * scale) / scale


ENCODINGS = ("if", "current")
READOUTS = ("count", "potential")


def _if_spikes(current: torch.Tensor, threshold: float) -> torch.Tensor:
    """IF neurons (no leak, reset by subtraction) over ``current`` ``[T, ...]``: spikes ``[T, ...]``."""
    return multistep_neuron(current, neuron="if", v_threshold=threshold, v_reset=None)[0]


class CQSpikingNet(nn.Module):
    """IF-neuron SNN converted from a CQ-trained ANN; input ``[N, ...]`` (analog in [0, 1]:
    IF-encoded into spikes, or with ``input_encoding="current"`` repeated as a constant
    current, for T steps) or ``[T, N, ...]`` (used as it is); returns ``[N, classes]``: the
    last layer's spike count / T (``readout="count"``) or accumulated potential / T
    (``"potential"``). ``thresholds``: one per layer, the last one's for the count readout."""

    def __init__(self, layers: list[nn.Module], thresholds: list[float], between: list[nn.Module], timesteps: int,
                 input_encoding: str = "if", readout: str = "count"):
        super().__init__()
        if input_encoding not in ENCODINGS or readout not in READOUTS:
            raise ValueError(f"input_encoding must be one of {ENCODINGS} and readout one of {READOUTS}, got "
                             f"{input_encoding!r}, {readout!r}")
        self.layers = nn.ModuleList(layers)
        self.between = nn.ModuleList(between)  # flatten / pooling applied to spikes before each layer
        self.thresholds = list(thresholds)
        self.timesteps, self.input_encoding, self.readout = timesteps, input_encoding, readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x
        if x.dim() in (2, 4):
            x_seq = x.unsqueeze(0).expand(self.timesteps, *x.shape)
            if self.input_encoding == "if":
                x_seq = _if_spikes(x_seq, 1.0)
        T, N = x_seq.shape[:2]
        for i, layer in enumerate(self.layers):
            out = layer(self.between[i](x_seq.flatten(0, 1)))
            current = out.view(T, N, *out.shape[1:])
            if i == len(self.layers) - 1 and self.readout == "potential":
                return current.mean(0)
            x_seq = _if_spikes(current, self.thresholds[i])
        return x_seq.mean(0)


def to_snn(ann: nn.Sequential, timesteps: int, weight_bits: int | None = None, input_encoding: str = "if",
           readout: str = "count") -> CQSpikingNet:
    """Converts a CQ-trained ``ann`` (an nn.Sequential of Conv2d/Linear, optional BatchNorm,
    ClampQuantize, and shape-only modules such as Flatten / AvgPool2d) to a ``CQSpikingNet``
    (``input_encoding`` and ``readout`` as its own).

    BatchNorms are fused; each weight layer is normalised by max(max|W|, max|b|) (threshold
    scaled by the same factor, so spikes are unchanged); ``weight_bits`` rounds the normalised
    weights and biases to fixed point (module doc, step 3)."""
    modules = list(ann)
    layers, thresholds, between, pending = [], [], [], []
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if i + 1 < len(modules) and isinstance(modules[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d)):
                m = fuse_bn(m, modules[i + 1])
                i += 1
            else:
                m = copy.deepcopy(m)
            norm = float(m.weight.detach().abs().max())
            if m.bias is not None:
                norm = max(norm, float(m.bias.detach().abs().max()))
            if norm == 0:
                raise ValueError(f"layer {len(layers)} has all-zero weights: it cannot be normalised")
            with torch.no_grad():
                for p in (m.weight, m.bias):
                    if p is not None:
                        p /= norm
                        if weight_bits is not None:
                            p.copy_(fixed_point(p, weight_bits))
            layers.append(m)
            thresholds.append(1.0 / norm)
            between.append(nn.Sequential(*pending))
            pending = []
        elif isinstance(m, ClampQuantize):
            if m.timesteps != timesteps:
                raise ValueError(f"the ANN was trained for T={m.timesteps}, asked to convert for T={timesteps}")
        elif isinstance(m, (nn.Flatten, nn.AvgPool2d, nn.Identity)):
            pending.append(copy.deepcopy(m))
        else:
            raise ValueError(f"to_snn cannot convert a {type(m).__name__} (module {i})")
        i += 1
    if not layers:
        raise ValueError("the ANN has no Conv2d or Linear layer")
    return CQSpikingNet(layers, thresholds, between, timesteps, input_encoding, readout)


@dataclasses.dataclass(frozen=True)
class CQConfig:
    """Hyper-parameters of CQ training and conversion.

    Attributes:
        timesteps: T, the activation levels of ``ClampQuantize`` and the SNN's timesteps.
        weight_bits: fixed-point bits of the converted SNN's weights (None: float).
        input_encoding, readout: the converted SNN's input and output (``CQSpikingNet``;
            default as the authors: IF-encoded input spikes, spike count / T).
        lr, optimizer, momentum, weight_decay: the ANN's optimizer (as ``CBPConfig``'s).
        batch_size, epochs, seed: the recipe.
    """

    timesteps: int = 4
    weight_bits: int | None = 8
    input_encoding: str = "if"
    readout: str = "count"
    lr: float = 1e-2
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 12
    seed: int = 0

    def __post_init__(self):
        for name in ("timesteps", "batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CQConfig.{name} must be an integer >= 1, got {value!r}")
        if self.weight_bits is not None and (not isinstance(self.weight_bits, int) or self.weight_bits < 2):
            raise ValueError(f"CQConfig.weight_bits must be None or an integer >= 2, got {self.weight_bits!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"CQConfig.lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"CQConfig.optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.input_encoding not in ENCODINGS:
            raise ValueError(f"CQConfig.input_encoding must be one of {ENCODINGS}, got {self.input_encoding!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"CQConfig.readout must be one of {READOUTS}, got {self.readout!r}")


class CQTrainer(QuantTrainer):
    """CQ training of an ANN (``nn.Sequential`` with ``ClampQuantize`` activations), with the
    quantizers' loop: ``fit`` (progress, eval, atomic checkpoints, bit-identical resume),
    ``history`` and plots; ``finalize()`` converts it (``to_snn``). Its weight histograms
    are of W / max|W|, the normalisation the conversion applies."""

    def __init__(self, ann: nn.Sequential, config: CQConfig | None = None):
        config = config or CQConfig()
        if not isinstance(config, CQConfig):
            raise TypeError(f"config must be a CQConfig, got {type(config).__name__}")
        wrong = [m.timesteps for m in ann.modules() if isinstance(m, ClampQuantize) and m.timesteps != config.timesteps]
        if wrong:
            raise ValueError(f"the ANN's ClampQuantize levels {sorted(set(wrong))} differ from CQConfig.timesteps "
                             f"{config.timesteps}")
        super().__init__(ann, torch.tensor([-1.0, 1.0]), [], config, None)

    def _level_units(self, layer) -> torch.Tensor:
        return layer.weight / layer.weight.abs().max().clamp_min(1e-12)

    def finalize(self) -> tuple[CQSpikingNet, dict[str, dict]]:
        """``(snn, export)``: the converted SNN (``to_snn`` with ``config.weight_bits``) and,
        per weight layer of the ANN, ``{"bits": weight_bits, "norm": max|W|}``."""
        self.model.eval()
        snn = to_snn(self.net, self.config.timesteps, weight_bits=self.config.weight_bits,
                     input_encoding=self.config.input_encoding, readout=self.config.readout)
        export = {name: {"bits": self.config.weight_bits, "norm": float(layer.weight.detach().abs().max())}
                  for name, layer in self.layers.items()}
        return snn, export
