"""``torch.compile(model, fullgraph=True)`` on LIFConv2d stacks and the library models, in
training (outputs and gradients) and in eval, equal to eager. Compiled with the
``aot_eager`` backend: it traces exactly what inductor would (Dynamo's whole graph, the
custom ops' fakes, the autograd functions) without inductor's C++ code generation, so the
test stays in seconds; the ops' own inductor compilation is tested with each op."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cbp_kernels import LIFConv2d, models

from conftest import assert_close


def _reset(model):
    for m in model.modules():
        if m is not model and hasattr(m, "reset"):
            m.reset()


def _lifconv_stack():
    torch.manual_seed(0)
    net = nn.Sequential(LIFConv2d(3, 8, 3, padding=1, neuron="plif"), LIFConv2d(8, 8, 3, padding=1, neuron="if"),
                        LIFConv2d(8, 4, 3, stride=2, padding=1, neuron=None, weight_levels="ternary"))
    with torch.no_grad():
        for layer in net:
            layer.bn.weight.uniform_(1.0, 3.0)
            layer.bn.bias.uniform_(0.0, 0.5)
    return net, (torch.rand(3, 2, 3, 8, 8) < 0.4).float()


def _sew_resnet18():
    torch.manual_seed(0)
    return models.sew_resnet18(num_classes=5, T=2), torch.rand(2, 2, 3, 16, 16)


def _digits_net():
    torch.manual_seed(0)
    return models.DigitsNet(), torch.rand(2, 3, 1, 8, 8)


@pytest.mark.parametrize("build", [_lifconv_stack, _sew_resnet18, _digits_net],
                         ids=["lifconv-stack", "sew-resnet18", "digits-net"])
def test_compile_fullgraph_matches_eager(build):
    torch._dynamo.reset()
    eager, x = build()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for mode in ("train", "eval"):
        outs = []
        for model, run in ((eager, eager), (compiled_model, compiled)):
            getattr(model, mode)()
            _reset(model)
            xi = x.clone().requires_grad_(mode == "train")
            with torch.set_grad_enabled(mode == "train"):
                y = run(xi)
            grads = ()
            if mode == "train":
                (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
                grads = (xi.grad, *[p.grad.clone() for p in model.parameters()])
                model.zero_grad()
            outs.append((y.detach(), grads))
        (y_e, g_e), (y_c, g_c) = outs
        assert y_e.abs().sum() > 0, "an all-zero output would prove nothing"
        assert_close(y_c, y_e, 1e-5, 1e-5, f"{mode} output")
        for i, (a, b) in enumerate(zip(g_c, g_e)):
            assert_close(a, b, 1e-4, 1e-4, f"grad {i}")
