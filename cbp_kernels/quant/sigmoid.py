"""SigmoidQuantizer: differentiable sigmoid-sum weight quantization (seed paper 001, in the
style of Quantization Networks, CVPR 2019), the first peer of CBP, on the same kernels and
with the same API shape as ``CBPQuantizer``.

Each quantized layer computes with y = alpha * (sum_i s_i sigmoid(T (beta w - b_i)) - o)
(``cbp_kernels.ops.sigmoid_quantize``: one fused kernel forward, one backward), alpha and
beta learned per layer, the temperature T = min((epoch + 1) * T0, T_max) growing with the
epoch; at inference the hard steps. ``finalize`` forces the weights onto alpha * levels and
returns the model with CBP's quantized layers (scale = alpha), so the export, packing and
evaluation paths are the same for every method.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..nn.quantized import QuantizedLayer, float_twin
from ..nn.sigmoid_quant import SigmoidQuantized
from ..ops.levels import resolve_levels
from ..ops.sigmoid_quant import level_table
from .trainer import QuantTrainer, _swap, weight_export

__all__ = ["SigmoidConfig", "SigmoidQuantizer", "kmeans_biases"]


@dataclasses.dataclass(frozen=True)
class SigmoidConfig:
    """Hyper-parameters of the sigmoid-sum quantizer.

    Attributes:
        lr, optimizer, momentum, weight_decay: the optimizer of every trainable parameter
            (weights, alpha, beta, the rest of the model), as ``CBPConfig``'s. Default as the
            Quantization Networks code (aliyun/alibabacloud-quantization-networks@05522aa,
            quan_weight_main.py and quan-weight.sh): SGD, momentum 0.9, lr 1e-3, weight decay 1e-4.
        temperature0: T0; epoch e trains at T = min((e + 1) * T0, temperature_max).
        temperature_max: the cap of T.
        grad_clip, clip: the gradient clip before each step (None: none), ``"norm"`` (total
            2-norm, default 5: that code's ``clip_grad_norm(model.parameters(), 5.0)``) or
            ``"value"``.
        kmeans_biases: the sigmoids' biases b_i at the midpoints between the k-means centres
            of each layer's scaled weights beta * W (one centre per level, started on the
            levels; k-means assigns by these midpoints) instead of the level midpoints. None
            (default): as that code, k-means for three or more levels (tools/cluster.py: the
            biases of ternary and wider sets come from clustering the scaled weights), the
            midpoint 0 for binary (config.py: biases 0).
        batch_size, epochs, timesteps, seed: the recipe, as ``CBPConfig``'s.
    """

    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature0: float = 5.0
    temperature_max: float = 200.0
    grad_clip: float | None = 5.0
    clip: str = "norm"
    kmeans_biases: bool | None = None
    batch_size: int = 16
    epochs: int = 30
    timesteps: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("lr", "temperature0", "temperature_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SigmoidConfig.{name} must be a finite number > 0, got {value!r}")
        if self.temperature_max < self.temperature0:
            raise ValueError(f"SigmoidConfig.temperature_max ({self.temperature_max}) must be >= temperature0 "
                             f"({self.temperature0})")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"SigmoidConfig.grad_clip must be None or > 0, got {self.grad_clip!r}")
        if self.kmeans_biases is not None and not isinstance(self.kmeans_biases, bool):
            raise ValueError(f"SigmoidConfig.kmeans_biases must be None or a bool, got {self.kmeans_biases!r}")
        if self.clip not in ("value", "norm"):
            raise ValueError(f"SigmoidConfig.clip must be 'value' or 'norm', got {self.clip!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"SigmoidConfig.optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        for name in ("batch_size", "epochs", "timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SigmoidConfig.{name} must be an integer >= 1, got {value!r}")

    def temperature(self, epoch: int) -> float:
        return min((epoch + 1) * self.temperature0, self.temperature_max)


def kmeans_biases(x: torch.Tensor, levels: torch.Tensor, max_samples: int = 1 << 20) -> torch.Tensor:
    """Midpoints between the sorted k-means centres of ``x`` (1-D k-means, one centre per
    level, started on the levels; scikit-learn's KMeans on at most ``max_samples`` evenly
    strided values), float32 on ``x``'s device: the sigmoids' biases b_i."""
    from sklearn.cluster import KMeans

    flat = x.detach().flatten().double().cpu()
    flat = flat[:: max(1, flat.numel() // max_samples)].numpy().reshape(-1, 1)
    init = levels.double().cpu().numpy().reshape(-1, 1)
    k = min(len(init), len(set(flat.ravel().tolist())))
    if k < len(init):
        raise ValueError(f"k-means needs at least {len(init)} distinct weights, got {k}")
    centres = torch.from_numpy(KMeans(n_clusters=len(init), init=init, n_init=1).fit(flat).cluster_centers_.ravel())
    centres = centres.sort().values
    return ((centres[1:] + centres[:-1]) / 2).float().to(x.device)


class SigmoidQuantizer(QuantTrainer):
    """Quantizes a model's weights with the sigmoid-sum function (see the module doc).

    Args:
        model: the pre-trained model (layers swapped IN PLACE for
            ``cbp_kernels.nn.SigmoidQuantConv2d`` / ``SigmoidQuantLinear``).
        levels: ``"binary"``, ``"ternary"`` or a sorted list symmetric about 0.
        exclude: as ``CBPQuantizer``'s (default: the first and the last quantizable layer).
        config: a ``SigmoidConfig``.
        backend: the backend of the fused sigmoid-sum op.

    ``fit``, ``state_dict`` and the checkpoints are ``CBPQuantizer``'s (``QuantTrainer``).
    """

    def __init__(self, model: nn.Module, levels: str | Sequence[float] = "binary",
                 exclude: Iterable[str] | None = None, config: SigmoidConfig | None = None, backend: str = "auto"):
        if config is not None and not isinstance(config, SigmoidConfig):
            raise TypeError(f"config must be a SigmoidConfig, got {type(config).__name__}")
        levels = resolve_levels(levels)
        level_table(levels)  # the sigmoid sum needs a symmetric level set: say so before any change
        super().__init__(model, levels, exclude, config or SigmoidConfig(), SigmoidQuantized)
        kmeans = self.config.kmeans_biases if self.config.kmeans_biases is not None else len(levels) > 2
        for layer in self.layers.values():
            layer.quant_backend = backend
            if kmeans:
                layer.biases = kmeans_biases(layer.weight.detach() * layer.beta.detach(), self.levels)
        self._start_epoch()

    @property
    def temperature(self) -> float:
        return self.config.temperature(self.epoch)

    def _start_epoch(self) -> None:
        for layer in self.layers.values():
            layer.temperature = self.temperature

    def _progress(self, L: float) -> dict:
        return {"T": f"{self.temperature:.3g}"}

    def _level_units(self, layer) -> torch.Tensor:
        return layer.weight * layer.beta  # the sigmoids' thresholds b_i are level midpoints in beta*w

    def _epoch_record(self) -> dict:
        return {"temperature": self.temperature}

    @torch.no_grad()
    def finalize(self) -> tuple[nn.Module, dict[str, dict]]:
        """Forces every weight onto its hard level (W <- alpha * q) and swaps each layer for
        CBP's quantized layer with scale alpha (its Q(W) = W then), so export, packing and
        evaluation are the same as for ``CBPQuantizer``. Returns ``(model, export)`` with
        ``export[name] = {"codes", "scale", "levels"}`` as ``CBPQuantizer.finalize``."""
        export = {}
        for name, layer in list(self.layers.items()):
            training = layer.training
            layer.eval()
            layer.weight.copy_(layer.quantized_weight())  # alpha * q; with alpha < 0 still on |alpha| * levels
            alpha = layer.alpha.detach().abs().reshape(())
            qlayer = QuantizedLayer.from_float(float_twin(layer), self.levels, alpha)
            qlayer.train(training)
            _swap(self.net, name, qlayer)
            self.layers[name] = qlayer
            export[name] = weight_export(qlayer)
        return self.model, export
