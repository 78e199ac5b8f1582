"""Small multi-step pieces shared by the model files: frame-wise modules over [T, N, ...]
and the SEW connect functions."""
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


def sew_connect(identity: torch.Tensor, out: torch.Tensor, cnf: str) -> torch.Tensor:
    """SEW residual connection g(S, A) of the identity spikes S and the block output A
    (Fang et al. 2021): ADD: S + A, AND: S * A, IAND: S * (1 - A). The products save
    their spike operands for the backward at 1 bit each."""
    if cnf == "ADD":
        return identity + out
    with compact_saved_tensors():
        return identity * out if cnf == "AND" else identity * (1.0 - out)
