"""Small multi-step pieces shared by the model files: frame-wise modules over [T, N, ...],
the SEW connect functions and the input-range declarations.

Every conv / linear layer of a library model declares what it reads, as the attribute
``input_max``: None for real-valued input (the images or DVS frames the first layer reads,
average-pooled spikes, the readout's mean rates), k for integers in [0, k] (1 for a neuron's
spikes, more after SEW ADD connections, which sum spike maps). The quantized layers run their
exact integer forward from it (``cbp_kernels.nn.integer_forward``), with no check per call."""
from __future__ import annotations

import torch
from torch import nn

from ..nn.lifconv import compact_saved_tensors

CONNECT_FUNCTIONS = ("ADD", "AND", "IAND")


class SeqFrames(nn.Module):
    """Applies a frame-wise module (pooling, ...) to ``[T, N, ...]`` by merging T and N."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.flatten(0, 1))
        return y.view(x.shape[0], x.shape[1], *y.shape[1:])


class SpikingModel(nn.Module):
    """Base of the models: ``reset()`` forgets every neuron's membrane state (call it between
    samples, as SpikingJelly's ``functional.reset_net``, which also works on these models)."""

    def reset(self) -> None:
        for m in self.modules():
            if m is not self and callable(getattr(m, "reset", None)):
                m.reset()


def check_connect(cnf: str) -> str:
    if cnf not in CONNECT_FUNCTIONS:
        raise ValueError(f"cnf (the SEW connect function) must be one of {CONNECT_FUNCTIONS}, got {cnf!r}")
    return cnf


def declare_input(layer: nn.Module, input_max: int | None) -> nn.Module:
    """Sets ``layer.input_max`` (see the module docstring); returns the layer."""
    layer.input_max = input_max
    return layer


def sew_output_max(identity_max: int | None, cnf: str | None) -> int | None:
    """The largest value of a block's output g(S, A) given its identity's S (A: the block's
    spikes): ADD S + A, AND / IAND at most S; ``cnf=None`` (spiking ResNet: a neuron after
    the sum) spikes."""
    if cnf is None:
        return 1
    if identity_max is None:
        return None
    return identity_max + 1 if cnf == "ADD" else identity_max


def sew_connect(identity: torch.Tensor, out: torch.Tensor, cnf: str) -> torch.Tensor:
    """SEW residual connection g(S, A) of the identity spikes S and the block output A
    (Fang et al. 2021): ADD: S + A, AND: S * A, IAND: S * (1 - A). The products save
    their spike operands for the backward at 1 bit each."""
    if cnf == "ADD":
        return identity + out
    with compact_saved_tensors():
        return identity * out if cnf == "AND" else identity * (1.0 - out)
