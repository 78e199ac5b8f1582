"""The small spiking conv net of the embedded default job (8x8 digits)."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import LIF, ClampQuantize
from ._layers import declare_input

__all__ = ["DigitsNet", "digits_cq_ann"]


class DigitsNet(nn.Module):
    """conv 1->c1 3x3 - LIF - conv c1->c2 3x3 stride 2 - LIF - linear 16*c2->hidden - LIF -
    linear hidden->classes, on ``[T, N, 1, 8, 8]`` float input (direct input current).

    Returns logits ``[N, num_classes]`` float: the mean over T of the readout layer applied
    to the hidden spikes. The hidden layers have
    no bias and see only spikes, so CBP can quantize them and ``PackedConv2d`` /
    ``PackedLinear`` can run them; the first conv (analog input) and the readout stay FP32.
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32), hidden: int = 128,
                 tau: float = 2.0, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        c1, c2 = channels
        side = (image_size + 1) // 2
        self.config = dict(num_classes=num_classes, channels=[c1, c2], hidden=hidden, tau=tau,
                           in_channels=in_channels, image_size=image_size)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.lif1 = LIF(tau=tau, surrogate_function="atan", step_mode="m")
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False)
        self.lif2 = LIF(tau=tau, surrogate_function="atan", step_mode="m")
        self.fc1 = nn.Linear(c2 * side * side, hidden, bias=False)
        self.lif3 = LIF(tau=tau, surrogate_function="atan", step_mode="m")
        self.fc2 = nn.Linear(hidden, num_classes)
        # what each layer reads (cbp_kernels.models._layers): the input current, then spikes
        for m, input_max in ((self.conv1, None), (self.conv2, 1), (self.fc1, 1), (self.fc2, 1)):
            declare_input(m, input_max)
        for m in (self.conv1, self.conv2, self.fc1, self.fc2):
            # He init: with PyTorch's default (3x smaller) the LIF layers hardly fire at first
            # and training stalls for an epoch.
            nn.init.kaiming_normal_(m.weight)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``x_seq``: ``[T, N, C, H, W]`` -> logits ``[N, num_classes]``."""
        T, N = x_seq.shape[:2]
        for m in (self.lif1, self.lif2, self.lif3):
            m.reset()
        h = self.lif1(self.conv1(x_seq.flatten(0, 1)).unflatten(0, (T, N)))
        h = self.lif2(self.conv2(h.flatten(0, 1)).unflatten(0, (T, N)))
        h = self.lif3(self.fc1(h.flatten(2)))
        return self.fc2(h).mean(0)


def digits_cq_ann(timesteps: int, num_classes: int = 10, channels: tuple[int, int] = (16, 32), hidden: int = 128,
                  in_channels: int = 1, image_size: int = 8) -> nn.Sequential:
    """The CQ (seed paper 003) ANN twin of ``DigitsNet``, for ``cbp_kernels.quant.cq.to_snn``:
    conv in->c1 3x3 p1 - BN - ClampQuantize(T) - conv c1->c2 3x3 s2 p1 - BN - ClampQuantize(T)
    - Flatten - linear 16*c2->hidden - BN1d - ClampQuantize(T) - linear hidden->classes.

    Input ``[N, in_channels, image_size, image_size]`` float (the static image, no time axis);
    returns logits ``[N, num_classes]``. Each ClampQuantize's T levels are the spike counts
    of the converted SNN's IF neurons over ``timesteps`` steps."""
    c1, c2 = channels
    side = (image_size + 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), ClampQuantize(timesteps),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), ClampQuantize(timesteps),
        nn.Flatten(), nn.Linear(c2 * side * side, hidden, bias=False), nn.BatchNorm1d(hidden),
        ClampQuantize(timesteps), nn.Linear(hidden, num_classes))
