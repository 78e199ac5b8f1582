"""SEW-ResNet-18/34/50/101/152 (Fang et al., 2021, "Deep residual learning in spiking neural
networks") and the plain spiking ResNet, built from ``LIFConv2d``.

The architecture is SpikingJelly 2.0's ``activation_based.model.sew_resnet`` (torchvision's
ResNet with every ReLU a spiking neuron, the ImageNet stem conv7x7/2 - BN - IF - maxpool3x3/2,
IF neurons with the ATan surrogate and ``detach_reset=True`` as in the paper); every
Conv2d - BatchNorm2d - neuron triple is one ``LIFConv2d`` (state-dict names differ: see
``cbp_kernels.models.interop`` for loading SpikingJelly and original-repository checkpoints).

Input: ``[T, N, 3, H, W]``, or a static batch ``[N, 3, H, W]`` which is repeated ``T`` times
(the original repository's ImageNet input). Output: ``[T, N, num_classes]`` (the fc applied at
each step; average over T for the prediction, as the original model's ``fc(x.mean(0))``).

One difference from SpikingJelly 2.0: its Bottleneck calls ``sew_function(out, identity)``, so
its IAND computes A * (1 - S); here every block computes the paper's (and the original
repository's) IAND S * (1 - A). ADD and AND are symmetric, so they agree everywhere.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn.lifconv import LIFConv2d
from ..nn.neuron import IF, LIF, PLIF
from ..nn.pool import MaxPool2d
from ._layers import SeqFrames, SpikingModel, check_connect, declare_input, sew_connect, sew_output_max

__all__ = ["SEWResNet", "sew_resnet18", "sew_resnet34", "sew_resnet50", "sew_resnet101", "sew_resnet152",
           "spiking_resnet18", "spiking_resnet34", "spiking_resnet50", "spiking_resnet101", "spiking_resnet152"]

_LAYERS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
           101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}


class _Spiking:
    """The neuron settings every layer of one network shares."""

    def __init__(self, neuron, surrogate, detach_reset, v_threshold, tau, backend):
        self.kw = dict(neuron=neuron, surrogate_function=surrogate, detach_reset=detach_reset, v_threshold=v_threshold,
                       tau=tau, backend=backend)

    def conv(self, cin, cout, k, stride=1, padding=0, spiking=True):
        kw = dict(self.kw) if spiking else dict(self.kw, neuron=None)
        return LIFConv2d(cin, cout, k, stride=stride, padding=padding, bias=False, **kw)

    def neuron(self):
        kind = self.kw["neuron"]
        common = dict(v_threshold=self.kw["v_threshold"], surrogate_function=self.kw["surrogate_function"],
                      detach_reset=self.kw["detach_reset"], step_mode="m", backend=self.kw["backend"])
        if kind == "if":
            return IF(**common)
        return (LIF(tau=self.kw["tau"], **common) if kind == "lif" else PLIF(init_tau=self.kw["tau"], **common))


class BasicBlock(nn.Module):
    """conv3x3 - BN - SN - conv3x3 - BN - SN, joined to the (downsampled) input by ``cnf``;
    ``cnf=None``: the spiking ResNet block, SN after the addition."""

    expansion = 1

    def __init__(self, sp: _Spiking, inplanes, planes, stride, cnf):
        super().__init__()
        self.cnf = cnf
        self.conv1 = sp.conv(inplanes, planes, 3, stride, 1)
        self.conv2 = sp.conv(planes, planes, 3, 1, 1, spiking=cnf is not None)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = sp.conv(inplanes, planes, 1, stride, 0, spiking=cnf is not None)
        if cnf is None:
            self.sn2 = sp.neuron()

    def residual(self, x):
        return self.conv2(self.conv1(x))

    def declare_inputs(self, input_max: int | None) -> int | None:
        """Declares each conv's ``input_max`` for a block input in [0, input_max]; returns
        the block output's."""
        declare_input(self.conv1, input_max)
        for i in range(2, self.n_convs + 1):
            declare_input(getattr(self, f"conv{i}"), 1)  # the previous conv's spikes
        if self.downsample is not None:
            declare_input(self.downsample, input_max)
        return sew_output_max(1 if self.downsample is not None else input_max, self.cnf)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.residual(x)
        if self.cnf is None:
            return getattr(self, f"sn{self.n_convs}")(out + identity)
        return sew_connect(identity, out, self.cnf)

    n_convs = 2


class Bottleneck(BasicBlock):
    """conv1x1 - conv3x3(stride) - conv1x1(x4), each with BN and SN (torchvision's v1.5)."""

    expansion = 4
    n_convs = 3

    def __init__(self, sp: _Spiking, inplanes, planes, stride, cnf):
        nn.Module.__init__(self)
        self.cnf = cnf
        out = planes * self.expansion
        self.conv1 = sp.conv(inplanes, planes, 1)
        self.conv2 = sp.conv(planes, planes, 3, stride, 1)
        self.conv3 = sp.conv(planes, out, 1, spiking=cnf is not None)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = sp.conv(inplanes, out, 1, stride, 0, spiking=cnf is not None)
        if cnf is None:
            self.sn3 = sp.neuron()

    def residual(self, x):
        return self.conv3(self.conv2(self.conv1(x)))


class SEWResNet(SpikingModel):
    """SEW-ResNet (``cnf`` in ADD / AND / IAND) or spiking ResNet (``cnf=None``).

    Args:
        depth: 18, 34, 50, 101 or 152.
        cnf: the SEW connect function, or ``None`` for the plain spiking ResNet.
        num_classes: fc outputs. T: steps a static ``[N, 3, H, W]`` input is repeated.
        neuron, surrogate, detach_reset, v_threshold, tau, backend: of every neuron
            (default: IF, ATan, detach_reset=True as the paper).
        zero_init_residual: zero the last BN's weight of each block.
    """

    def __init__(self, depth=18, cnf="ADD", num_classes=1000, T=4, neuron="if", surrogate="atan",
                 detach_reset=True, v_threshold=1.0, tau=2.0, zero_init_residual=False, backend="auto"):
        super().__init__()
        if depth not in _LAYERS:
            raise ValueError(f"depth must be one of {sorted(_LAYERS)}, got {depth!r}")
        if cnf is not None:
            check_connect(cnf)
        if not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be a positive int, got {T!r}")
        self.depth, self.cnf, self.T = depth, cnf, T
        kind, layers = _LAYERS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        sp = _Spiking(neuron, surrogate, detach_reset, v_threshold, tau, backend)
        self.conv1 = declare_input(sp.conv(3, 64, 7, 2, 3), None)  # the images
        self.maxpool = SeqFrames(MaxPool2d(kernel_size=3, stride=2, padding=1))
        inplanes, bound = 64, 1  # the stem's spikes, max-pooled
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(sp, inplanes, planes, 2 if (i > 0 and j == 0) else 1, cnf))
                bound = blocks[-1].declare_inputs(bound)
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = SeqFrames(nn.AdaptiveAvgPool2d((1, 1)))
        self.fc = declare_input(nn.Linear(512 * block.expansion, num_classes), None)  # mean rates
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(getattr(m, f"conv{m.n_convs}").bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(0).expand(self.T, *x.shape)
        if x.dim() != 5:
            raise ValueError(f"expected input [T, N, 3, H, W] or [N, 3, H, W], got shape {tuple(x.shape)}")
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(2))



def _builder(depth, cnf_default):
    def build(cnf=cnf_default, **kwargs) -> SEWResNet:
        return SEWResNet(depth, cnf=cnf, **kwargs)

    kind = "SEW-ResNet" if cnf_default else "Spiking ResNet"
    build.__name__ = f"{'sew' if cnf_default else 'spiking'}_resnet{depth}"
    build.__doc__ = f"{kind}-{depth}; keyword arguments as ``SEWResNet``."
    return build


sew_resnet18, sew_resnet34, sew_resnet50, sew_resnet101, sew_resnet152 = (_builder(d, "ADD") for d in _LAYERS)
spiking_resnet18, spiking_resnet34, spiking_resnet50, spiking_resnet101, spiking_resnet152 = (
    _builder(d, None) for d in _LAYERS)
