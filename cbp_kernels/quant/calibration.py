"""Algorithm 2's initialisation for SNN-Calibration models: fold the layer thresholds into
the weights and biases so that every neuron fires at threshold 1.

For layers l = 1..L, each followed by neurons of threshold theta(l) (theta(0) = 1 for the
input, theta = 1 for a layer with no neuron after it):
    W(l) <- W(l) * theta(l-1) / theta(l),   b(l) <- b(l) / theta(l),   theta(l) <- 1.

That is the paper's Eq. 6, which rescales the classifier too (W(L) <- W(L) * theta(L-1)).
The authors' code (yoees/CBP-QSNN@006ec63, CBP-QSNN-SNN-Calibration/
main_calibration_quantize_cbp.py, "Rescale weight, bias, threshold") rescales only the
layers that have neurons (their ``SpikeModule`` convs) and leaves the classifier as
trained, so its logits shrink by theta(L-1) (a softmax temperature): ``spiking_only=True``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["rescale_thresholds", "threshold_pairs"]


def _theta(neuron: nn.Module | None) -> float:
    if neuron is None:
        return 1.0
    value = float(neuron.v_threshold)
    if not value > 0:
        raise ValueError(f"neuron threshold must be > 0 to rescale by it, got {value} in {type(neuron).__name__}")
    return value


def threshold_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """(layer, neuron) for each nn.Conv2d / nn.Linear of a feed-forward chain, in module
    order: the neuron is the first module with a ``v_threshold`` after the layer and before
    the next layer (None if there is none). For models with branches, build the pairs by hand."""
    pairs: list[tuple[nn.Module, nn.Module | None]] = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            pairs.append((module, None))
        elif hasattr(module, "v_threshold") and pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], module)
    return pairs


@torch.no_grad()
def rescale_thresholds(pairs: Sequence[tuple[nn.Module, nn.Module | None]], spiking_only: bool = False) -> list[float]:
    """Applies Algorithm 2's rescaling in place along the chain ``pairs`` (first layer first)
    and sets every neuron's ``v_threshold`` to 1. Returns the thresholds theta(l) it folded.
    ``spiking_only``: layers with no neuron after them (the classifier) are left unchanged,
    as the authors' code (module doc)."""
    thetas = [_theta(neuron) for _, neuron in pairs]
    previous = 1.0
    for (layer, neuron), theta in zip(pairs, thetas):
        if neuron is None and spiking_only:
            continue
        layer.weight.mul_(previous / theta)
        if layer.bias is not None:
            layer.bias.div_(theta)
        if neuron is not None:
            if isinstance(neuron.v_threshold, torch.Tensor):
                neuron.v_threshold.fill_(1.0)
            else:
                neuron.v_threshold = 1.0
        previous = theta
    return thetas
