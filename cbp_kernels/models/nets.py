"""The paper's plain and SEW spiking nets (CBP-QSNN, Tables 1-2), written as layer plans.

A plan is a string of tokens, each one layer, in order:

- ``<c>C<k>``: ``LIFConv2d(c_in, c, k, padding=k // 2)`` (BatchNorm if ``bn``) + neuron;
- ``SEW<c>``: a SEW block, two 3x3 ``LIFConv2d`` c -> c -> c joined to its input by ``cnf``
  (Fang et al. 2021, as the original repository's DVS128 Gesture / CIFAR10-DVS ``SEWBlock``);
- ``MP<k>`` / ``AP<k>``: max / average pooling with kernel and stride k;
- ``FC<n>``: ``nn.Linear`` (the map flattened before the first); every FC but the last is
  followed by a neuron, the last one's output is the network's output.

Input ``[T, N, C, H, W]``; output ``[T, N, classes]`` (average over T for a rate-coded
prediction).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..nn.lifconv import LIFConv2d
from ..nn.neuron import IF, LIF, PLIF
from ..nn.pool import MaxPool2d
from ._layers import SeqFrames, SpikingModel, check_connect, declare_input, sew_connect, sew_output_max

__all__ = ["PlanNet", "SEWBlock", "seven_b_net", "wide_seven_b_net", "alexnet", "conv7_fc3", "vgg16", "PLANS"]

PLANS = {
    # Paper sec. 4.1: 32C3-BN-PLIF-{SEW Block(32C)-MP2}*7-FC11 (DVS128 Gesture, 128x128).
    "7b_net": "32C3 " + "SEW32 MP2 " * 7 + "FC11",
    # 64C3-BN-PLIF-{SEW Block(64C)-MP2}*4-128C3-BN-PLIF-{SEW Block(128C)-MP2}*3-FC10 (CIFAR10-DVS).
    "wide_7b_net": "64C3 " + "SEW64 MP2 " * 4 + "128C3 " + "SEW128 MP2 " * 3 + "FC10",
    # TSSL-BP's CIFAR-10 AlexNet. The paper's text abbreviates it as
    # 96C3-256C3-MP2-384C3-256C3-FC1024-FC1024-FC10; its Table 1 memory (677 Mb FP32, 21.6 /
    # 42.7 Mb binary / ternary) is that of TSSL-BP's net, which has a second pooling and a
    # second 384C3: 96C3-256C3-P2-384C3-P2-384C3-256C3-1024-1024-10 (21,156,384 weights).
    "alexnet": "96C3 256C3 MP2 384C3 MP2 384C3 256C3 FC1024 FC1024 FC10",
    # Deng et al. 2021's STBP net "7Conv, 3FC": the paper gives no widths. This default is an
    # assumption (CIFARNet-like widths); pass your own plan to match a checkpoint.
    "conv7_fc3": "128C3 256C3 MP2 256C3 512C3 MP2 512C3 1024C3 MP2 1024C3 FC1024 FC512 FC10",
    # SNN-Calibration's CIFAR VGG-16 (13 convs with bias and BN, 5 poolings, one FC).
    "vgg16": "64C3 64C3 AP2 128C3 128C3 AP2 256C3 256C3 256C3 AP2 512C3 512C3 512C3 AP2 512C3 512C3 512C3 AP2 FC10",
}

_TOKEN = re.compile(r"^(?:(?P<conv>\d+)C(?P<k>\d+)|SEW(?P<sew>\d+)|(?P<pool>[MA])P(?P<p>\d+)|FC(?P<fc>\d+))$")


class SEWBlock(nn.Module):
    """Two 3x3 conv-BN-neuron layers (channels -> mid -> channels) and the SEW connection
    g(x, out): ADD x + out, AND x * out, IAND x * (1 - out)."""

    def __init__(self, channels: int, mid_channels: int, cnf: str, **layer_kw):
        super().__init__()
        self.cnf = check_connect(cnf)
        self.conv = nn.Sequential(LIFConv2d(channels, mid_channels, 3, padding=1, **layer_kw),
                                  LIFConv2d(mid_channels, channels, 3, padding=1, **layer_kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sew_connect(x, self.conv(x), self.cnf)

    def declare_inputs(self, input_max: int | None) -> int | None:
        """Declares the convs' ``input_max`` for a block input in [0, input_max]; returns the
        block output's."""
        declare_input(self.conv[0], input_max)
        declare_input(self.conv[1], 1)
        return sew_output_max(input_max, self.cnf)


class PlanNet(SpikingModel):
    """A spiking net from a plan string (see the module docstring).

    Args:
        plan: the tokens, e.g. ``PLANS["7b_net"]``.
        in_channels, input_size: input channels and (square) size, to size the first FC.
        cnf: connect function of the SEW blocks.
        neuron, tau, v_threshold, v_reset, surrogate, detach_reset, backend: every neuron's.
        bn, bias: BatchNorm after / bias in every conv.
    """

    def __init__(self, plan: str, in_channels: int, input_size: int, *, cnf: str = "ADD", neuron: str = "lif",
                 tau: float = 2.0, v_threshold: float = 1.0, v_reset: float | None = 0.0, surrogate="atan",
                 detach_reset: bool = False, bn: bool = True, bias: bool = False, backend: str = "auto"):
        super().__init__()
        self.plan = plan
        neuron_kw = dict(v_threshold=v_threshold, v_reset=v_reset, surrogate_function=surrogate,
                         detach_reset=detach_reset, step_mode="m", backend=backend)
        layer_kw = dict(neuron=neuron, tau=tau, v_threshold=v_threshold, v_reset=v_reset,
                        surrogate_function=surrogate, detach_reset=detach_reset, bn=bn, bias=bias, backend=backend)
        tokens = plan.split()
        fc_total = sum(t.startswith("FC") for t in tokens)
        if not tokens or not tokens[-1].startswith("FC"):
            raise ValueError(f"plan must end with an FC layer, got {plan!r}")
        layers, c, size, fcs, features = [], in_channels, input_size, 0, None
        bound = None  # input_max of what the next layer reads: the input is real-valued
        for tok in tokens:
            m = _TOKEN.match(tok)
            if m is None:
                raise ValueError(f"bad plan token {tok!r} (expected <c>C<k>, SEW<c>, MP<k>, AP<k> or FC<n>)")
            if fcs and not m["fc"]:
                raise ValueError(f"plan {plan!r}: only FC layers may follow an FC layer")
            if m["conv"]:
                k = int(m["k"])
                layers.append(LIFConv2d(c, int(m["conv"]), k, padding=k // 2, input_max=bound, **layer_kw))
                c, bound = int(m["conv"]), 1
            elif m["sew"]:
                if int(m["sew"]) != c:
                    raise ValueError(f"SEW{m['sew']} needs {m['sew']} input channels, the plan has {c} there")
                layers.append(SEWBlock(c, c, cnf, **layer_kw))
                bound = layers[-1].declare_inputs(bound)
            elif m["pool"]:
                k = int(m["p"])
                layers.append(SeqFrames(MaxPool2d(k, k) if m["pool"] == "M" else nn.AvgPool2d(k, k)))
                size //= k
                bound = bound if m["pool"] == "M" else None  # a max of integers; a mean is not one
            else:
                if features is None:
                    layers.append(nn.Flatten(2))
                    features = c * size * size
                layers.append(declare_input(nn.Linear(features, int(m["fc"])), bound))
                features = int(m["fc"])
                fcs += 1
                if fcs < fc_total:
                    layers.append(_neuron(neuron, tau, neuron_kw))
                    bound = 1
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected a multi-step input [T, N, C, H, W], got shape {tuple(x.shape)}")
        return self.layers(x)


def _neuron(kind, tau, kw):
    if kind == "if":
        return IF(**kw)
    return LIF(tau=tau, **kw) if kind == "lif" else PLIF(init_tau=tau, **kw)


def seven_b_net(cnf="ADD", num_classes=11, in_channels=2, input_size=128, **kw) -> PlanNet:
    """7B-Net (DVS128 Gesture): PLIF neurons (init tau 2, ATan, detach_reset) as the paper."""
    plan = _with_classes(PLANS["7b_net"], num_classes)
    return PlanNet(plan, in_channels, input_size, cnf=cnf, **{**dict(neuron="plif", detach_reset=True), **kw})


def wide_seven_b_net(cnf="ADD", num_classes=10, in_channels=2, input_size=128, **kw) -> PlanNet:
    """Wide-7B-Net (CIFAR10-DVS): PLIF neurons as the paper."""
    plan = _with_classes(PLANS["wide_7b_net"], num_classes)
    return PlanNet(plan, in_channels, input_size, cnf=cnf, **{**dict(neuron="plif", detach_reset=True), **kw})


def _with_classes(plan: str, num_classes: int) -> str:
    return plan.rsplit(" ", 1)[0] + f" FC{num_classes}"


def alexnet(num_classes=10, in_channels=3, input_size=32, **kw) -> PlanNet:
    """TSSL-BP's AlexNet (CIFAR-10): LIF neurons, no BatchNorm, no bias."""
    return PlanNet(_with_classes(PLANS["alexnet"], num_classes), in_channels, input_size,
                   **{**dict(neuron="lif", bn=False), **kw})


def conv7_fc3(num_classes=10, in_channels=3, input_size=32, plan=None, **kw) -> PlanNet:
    """The STBP "7Conv, 3FC" net (see ``PLANS["conv7_fc3"]`` for its assumed widths)."""
    return PlanNet(plan or _with_classes(PLANS["conv7_fc3"], num_classes), in_channels, input_size,
                   **{**dict(neuron="lif", bn=False), **kw})


def vgg16(num_classes=10, in_channels=3, input_size=32, **kw) -> PlanNet:
    """SNN-Calibration's VGG-16: IF neurons with soft reset, conv bias, BatchNorm (folded in eval)."""
    return PlanNet(_with_classes(PLANS["vgg16"], num_classes), in_channels, input_size,
                   **{**dict(neuron="if", v_reset=None, bn=True, bias=True), **kw})
