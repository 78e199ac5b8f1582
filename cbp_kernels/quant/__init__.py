"""The weight quantizers. ``CBPQuantizer`` (paper section 3.1, Algorithms 1 and 2) swaps a
model's layers for quantized ones and trains them onto a level set; ``CBPConfig`` and the
Table 4 ``PRESETS`` hold the hyper-parameters; level-set helpers, atomic checkpoints,
Algorithm 2's threshold rescaling and the plots come with it. The peers, on the same loop
(``QuantTrainer``): ``SigmoidQuantizer`` (seed paper 001) and ``cq`` (seed paper 003)."""
from ..ops.levels import LevelSet, resolve_levels
from .calibration import rescale_thresholds, threshold_pairs
from .cbp import CBPQuantizer, WindowSchedule, next_g
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, CBPConfig, get_preset
from .cq import CQConfig, CQTrainer
from .sigmoid import SigmoidConfig, SigmoidQuantizer
from .trainer import QuantTrainer

__all__ = [
    "CBPQuantizer", "CBPConfig", "PRESETS", "get_preset", "WindowSchedule", "next_g",
    "LevelSet", "resolve_levels", "rescale_thresholds", "threshold_pairs",
    "save_checkpoint", "load_checkpoint", "plot_history", "plot_weight_histograms",
    "SigmoidQuantizer", "SigmoidConfig", "QuantTrainer", "CQTrainer", "CQConfig",
]


def __getattr__(name: str):
    # The plots import matplotlib (~0.4 s): loaded on first use, not with cbp_kernels.
    if name in ("plot_history", "plot_weight_histograms"):
        from . import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
