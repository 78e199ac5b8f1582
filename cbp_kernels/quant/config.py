"""CBP hyper-parameters: the ``CBPConfig`` dataclass and the Table 4 presets (paper A.2).

``PRESETS`` maps ``"<pre-training algorithm>/<dataset>"`` to a config, e.g.
``PRESETS["sew-resnet/imagenet"]``; change a field with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
import math

__all__ = ["CBPConfig", "PRESETS", "get_preset", "OPTIMIZERS", "MULTIPLIER_OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam", "adamw")
MULTIPLIER_OPTIMIZERS = ("adam", "adamw")


@dataclasses.dataclass(frozen=True)
class CBPConfig:
    """Everything Algorithm 1 (and 2) needs besides the model, the data and the loss.

    Attributes:
        lr: eta_W, the weight learning rate.
        optimizer: the weight optimizer, ``"sgd"``, ``"adam"`` or ``"adamw"`` (as pre-training).
        momentum: SGD momentum (Table 4 gives none; 0.9 as in the CBP authors' code).
        weight_decay: w_d, L2 through the optimizer on the conv / linear weights only (not on
            biases, BN or neuron parameters, as in the CBP authors' code).
        lr_multiplier: eta_lambda, the learning rate of the multiplier optimizer.
        multiplier_optimizer: ``"adam"`` or ``"adamw"`` (AdamW for TSSL-BP), as
            torch.optim.Adam / AdamW with ``maximize=True`` and their default betas, eps and
            weight decay: one gradient-ascent step on sum(lambda * cs(W; g)) per update (the
            fused ``cbp_kernels.ops.multiplier_step``).
        lr_bias: eta_b, the bias learning rate when ``calibration`` (None: ``lr``).
        batch_size, epochs, timesteps: the training recipe (used by the CLI and recipes;
            ``CBPQuantizer.fit`` takes its loader and epoch count from its caller).
        p_max: an update of g and lambda is forced after p_max epochs without one.
        g: the initial window parameter (>= 1); g grows by 1 below 10 and by 10 from 10 on.
        lr_drop_g: the weight learning rate is multiplied by ``lr_drop_factor`` when g reaches
            this value (None: never).
        grad_clip: gradients are clipped by value to [-grad_clip, grad_clip] before each step.
        weight_clip: quantized weights are clamped to [-weight_clip, weight_clip] after each step.
        calibration: Algorithm 2 (SNN-Calibration): rescale weights and biases by the layer
            thresholds first, then train the biases too with ``lr_bias``, clamped to
            [-bias_clip, bias_clip] after each step.
        bias_clip: see ``calibration``.
        seed: base seed of the per-epoch data order (epoch e uses seed + e).
    """

    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_multiplier: float = 0.01
    multiplier_optimizer: str = "adam"
    lr_bias: float | None = None
    batch_size: int = 16
    epochs: int = 100
    timesteps: int = 4
    p_max: int = 20
    g: int = 1
    lr_drop_g: int | None = 20
    lr_drop_factor: float = 0.1
    grad_clip: float = 1.0
    weight_clip: float = 1.0
    calibration: bool = False
    bias_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("lr", "lr_multiplier", "grad_clip", "weight_clip", "bias_clip", "lr_drop_factor"):
            _positive(name, getattr(self, name))
        if self.lr_bias is not None:
            _positive("lr_bias", self.lr_bias)
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not _real(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"CBPConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"CBPConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.multiplier_optimizer not in MULTIPLIER_OPTIMIZERS:
            raise ValueError(f"CBPConfig.multiplier_optimizer must be one of {MULTIPLIER_OPTIMIZERS}, "
                             f"got {self.multiplier_optimizer!r}")
        for name in ("batch_size", "epochs", "timesteps", "p_max", "g"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CBPConfig.{name} must be an integer >= 1, got {value!r}")
        if self.lr_drop_g is not None and (not isinstance(self.lr_drop_g, int) or self.lr_drop_g < 2):
            raise ValueError(f"CBPConfig.lr_drop_g must be None or an integer >= 2, got {self.lr_drop_g!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"CBPConfig.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.calibration, bool):
            raise ValueError(f"CBPConfig.calibration must be a bool, got {self.calibration!r}")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value) -> None:
    if not _real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"CBPConfig.{name} must be a finite number > 0, got {value!r}")


def _tssl(**kw):
    return CBPConfig(optimizer="adamw", lr=2e-4, multiplier_optimizer="adamw", lr_multiplier=1e-4,
                     batch_size=50, epochs=200, timesteps=5, lr_drop_g=None, **kw)


def _stbp(**kw):
    return CBPConfig(optimizer="sgd", lr=5e-3, multiplier_optimizer="adam", lr_multiplier=5e-4,
                     batch_size=50, epochs=100, timesteps=8, **kw)


def _sew(**kw):
    return CBPConfig(optimizer="sgd", lr=0.1, multiplier_optimizer="adam", lr_multiplier=0.01, **kw)


def _calib(**kw):
    return CBPConfig(optimizer="sgd", lr=0.01, weight_decay=1e-4, lr_bias=0.01, multiplier_optimizer="adam",
                     lr_multiplier=1e-3, batch_size=128, epochs=100, timesteps=32, calibration=True, **kw)


#: Table 4 of the paper, one entry per (pre-training algorithm, dataset).
PRESETS: dict[str, CBPConfig] = {
    "tssl-bp/cifar10": _tssl(),
    "stbp/cifar10": _stbp(),
    "stbp/cifar100": _stbp(),
    "sew-resnet/dvs128-gesture": _sew(batch_size=16, epochs=200, timesteps=16),
    "sew-resnet/cifar10-dvs": _sew(batch_size=16, epochs=64, timesteps=16),
    "sew-resnet/imagenet": _sew(batch_size=32, epochs=100, timesteps=4),
    "snn-calib/cifar10": _calib(),
    "snn-calib/cifar100": _calib(),
}


def get_preset(name: str) -> CBPConfig:
    """``PRESETS[name]`` with an error that lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
