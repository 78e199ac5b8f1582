"""CBP hyper-parameters: the ``CBPConfig`` dataclass and the Table 4 presets (paper A.2).

``PRESETS`` maps ``"<pre-training algorithm>/<dataset>"`` to a config, e.g.
``PRESETS["sew-resnet/imagenet"]``; change a field with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
import math

from ..nn.integer_forward import check_integer_forward

__all__ = ["CBPConfig", "PRESETS", "get_preset", "OPTIMIZERS", "MULTIPLIER_OPTIMIZERS", "AMP_DTYPES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
MULTIPLIER_OPTIMIZERS = ("adam", "adamw")
TRAIN_PARAMS = ("all", "quantized")
CLIPS = ("value", "norm")
AMP_CLIP_ORDERS = ("unscaled", "scaled")
RESCALE_LAYERS = ("all", "spiking")
#: ``CBPConfig.amp`` -> the autocast dtype (None: float32 throughout).
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class CBPConfig:
    """Everything Algorithm 1 (and 2) needs besides the model, the data and the loss.

    Attributes:
        lr: eta_W, the weight learning rate.
        optimizer: the weight optimizer, ``"sgd"``, ``"adam"`` or ``"adamw"`` (as pre-training;
            Adam / AdamW with torch's defaults but ``weight_decay``).
        train_params: what the weight optimizer trains: ``"all"`` (every trainable parameter,
            as the authors' STBP, SEW-ResNet and SNN-Calibration code) or ``"quantized"`` (the
            quantized weights only, as their TSSL-BP code: the first and last layers stay as
            pre-trained; their gradients are still computed and, never zeroed, accumulate).
        momentum: SGD momentum (Table 4 gives none; 0.9 as in the CBP authors' code).
        weight_decay: w_d, L2 through the optimizer on the conv / linear weights only (not on
            biases, BN or neuron parameters, as in the CBP authors' code); AdamW: decoupled.
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
        grad_clip: the gradient clip before each step, over every parameter of the model that
            has a gradient (the authors' ``clip_grad_*_(model.parameters())``).
        clip: ``"value"`` (each gradient element to [-grad_clip, grad_clip], the authors' STBP,
            SEW-ResNet and SNN-Calibration code) or ``"norm"`` (all gradients scaled to a total
            2-norm of at most grad_clip, ``clip_grad_norm_``: their TSSL-BP code).
        weight_clip: quantized weights are clamped to [-weight_clip, weight_clip] after each step.
        other_weight_clip: None, or the clamp of every other conv / linear weight after each step
            (the TSSL-BP code's ``weight_clipper``: +-4).
        calibration: Algorithm 2 (SNN-Calibration): rescale weights and biases by the layer
            thresholds first (``rescale_layers``), then train the biases too with ``lr_bias``.
        rescale_layers: which layers Algorithm 2 rescales: ``"all"`` (the paper's Eq. 6: every
            layer by theta(l-1) / theta(l), the classifier by theta(L-1)) or ``"spiking"`` (only
            layers followed by a neuron, the classifier left as trained: the authors' code,
            ``main_calibration_quantize_cbp.py``, which produced the published numbers).
        bias_clip: None (the authors' code: biases are never clamped) or the clamp
            [-bias_clip, bias_clip] of the biases after each step (with ``calibration``; the
            paper's Algorithm 2 writes b <- clip(b - eta_b grad_b C) without a range).
        amp: None, ``"bf16"`` or ``"fp16"``: the forward and the loss under ``torch.autocast``
            in that dtype, the backward through a ``GradScaler`` (fp16; bf16 needs none), the
            weights, lambda and the constraint in float32 (the authors' ``--amp``).
        amp_clip: ``"unscaled"`` (unscale the gradients, then clip: torch's documented order)
            or ``"scaled"`` (clip the loss-scaled gradients, the authors' order: an effective
            clip of grad_clip / S for a loss scale S).
        timesteps_train: None, or train on a random sorted subset of this many of each batch's
            frames ([N, T, ...] inputs; the authors' DVS128 ``--T_train 12``); evaluation sees all T.
        seed: base seed of the per-epoch data order (epoch e uses seed + e).
        integer_forward: quantized layers whose input the model declares as integers
            (``input_max``: spikes, SEW ADD sums; ``cbp_kernels.models`` declare every layer)
            compute their forward exactly on the integer units, float32(count) * scale
            (``cbp_kernels.nn.integer_forward``): True on the layers where that is the faster
            forward (a rule on the weight's shape and the input range, measured:
            ``integer_forward.MIN_PRODUCTS_PER_PLANE``), ``"always"`` on all; False keeps the float32 forward
            F.conv2d(x, Q(W)), whose sums round in the library's order (the authors' numbers,
            ``tests/test_lockstep.py``). The backward is the same either way.
    """

    lr: float = 0.1
    optimizer: str = "sgd"
    train_params: str = "all"
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
    clip: str = "value"
    weight_clip: float = 1.0
    other_weight_clip: float | None = None
    calibration: bool = False
    rescale_layers: str = "all"
    bias_clip: float | None = None
    amp: str | None = None
    amp_clip: str = "unscaled"
    timesteps_train: int | None = None
    seed: int = 0
    integer_forward: bool | str = True

    def __post_init__(self):
        for name in ("lr", "lr_multiplier", "grad_clip", "weight_clip", "lr_drop_factor"):
            _positive(name, getattr(self, name))
        for name in ("lr_bias", "bias_clip", "other_weight_clip"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name, choices in (("train_params", TRAIN_PARAMS), ("clip", CLIPS), ("amp_clip", AMP_CLIP_ORDERS),
                              ("rescale_layers", RESCALE_LAYERS), ("amp", (None, *AMP_DTYPES))):
            if getattr(self, name) not in choices:
                raise ValueError(f"CBPConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.timesteps_train is not None and (not isinstance(self.timesteps_train, int)
                                                 or isinstance(self.timesteps_train, bool) or self.timesteps_train < 1):
            raise ValueError(f"CBPConfig.timesteps_train must be None or an integer >= 1, got {self.timesteps_train!r}")
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
        check_integer_forward(self.integer_forward, "CBPConfig.integer_forward")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str, value) -> None:
    if not _real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"CBPConfig.{name} must be a finite number > 0, got {value!r}")


def _tssl(**kw):
    # The authors' TSSL-BP code (CBP-QSNN-TSSL-BP/main_quantize_cbp.py, yoees/CBP-QSNN@006ec63):
    # AdamW over the quantized weights only at torch's default weight decay 0.01 (Table 4 lists
    # none), clip_grad_norm_(every layer weight, 1), weight_clipper: other layers to +-4.
    return CBPConfig(optimizer="adamw", lr=2e-4, weight_decay=0.01, train_params="quantized", clip="norm",
                     other_weight_clip=4.0, multiplier_optimizer="adamw", lr_multiplier=1e-4,
                     batch_size=50, epochs=200, timesteps=5, lr_drop_g=None, **kw)


def _stbp(**kw):
    return CBPConfig(optimizer="sgd", lr=5e-3, multiplier_optimizer="adam", lr_multiplier=5e-4,
                     batch_size=50, epochs=100, timesteps=8, **kw)


def _sew(**kw):
    return CBPConfig(optimizer="sgd", lr=0.1, multiplier_optimizer="adam", lr_multiplier=0.01, **kw)


def _calib(**kw):
    # The authors' code (CBP-QSNN-SNN-Calibration/main_calibration_quantize_cbp.py @006ec63)
    # rescales only the spiking (conv) layers and never clamps a bias.
    return CBPConfig(optimizer="sgd", lr=0.01, weight_decay=1e-4, lr_bias=0.01, multiplier_optimizer="adam",
                     lr_multiplier=1e-3, batch_size=128, epochs=100, timesteps=32, calibration=True,
                     rescale_layers="spiking", **kw)


#: Table 4 of the paper, one entry per (pre-training algorithm, dataset).
PRESETS: dict[str, CBPConfig] = {
    "tssl-bp/cifar10": _tssl(),
    "stbp/cifar10": _stbp(),
    "stbp/cifar100": _stbp(),
    # DVS128: the authors train on 12 random sorted frames of 16 (README: --T_train 12 --T 16)
    "sew-resnet/dvs128-gesture": _sew(batch_size=16, epochs=200, timesteps=16, timesteps_train=12),
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
