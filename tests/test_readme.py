"""The README is executable: every ```python block runs, each in a fresh namespace (so a
block that forgets ``import torch`` fails), with small stand-ins for what a user brings (a
model, data loaders, weights, a checkpoint file written into a temporary working directory).
A block that needs a GPU or a real dataset gets a stand-in here, never a skip. Blocks are
found by parsing the file, so sections added or edited elsewhere are run too."""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the opening fence, code)`` of every fenced block tagged ``python``."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, flags=re.S | re.M)]


BLOCKS = python_blocks(open(README, encoding="utf-8").read())


class _TinySpikingNet(nn.Module):
    """A user's model: two LIFConv2d layers and a linear read-out; static images
    ``[N, 1, 8, 8]`` are repeated over T = 2 steps; returns ``[T, N, 3]``."""

    def __init__(self):
        super().__init__()
        from cbp_kernels import LIFConv2d

        self.conv1 = LIFConv2d(1, 4, 3, padding=1, surrogate_function="atan")
        self.conv2 = LIFConv2d(4, 4, 3, stride=2, padding=1, surrogate_function="atan")
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        for m in (self.conv1, self.conv2):
            m.reset()
        x = x.unsqueeze(0).expand(2, *x.shape) if x.dim() == 4 else x
        return self.fc(self.conv2(self.conv1(x)).flatten(2))


def _sj_model():
    from spikingjelly.activation_based import layer, neuron

    return nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, bias=False, step_mode="m"),
                         layer.BatchNorm2d(4, step_mode="m"), neuron.LIFNode(step_mode="m"))


def stand_ins() -> dict:
    """Fresh stand-ins for the names the README's blocks take from the user (in the
    working directory: the files they read)."""
    from cbp_kernels import models
    from cbp_kernels.models.digits_net import digits_cq_ann
    from cbp_kernels.models.interop import save_spikingjelly

    torch.manual_seed(0)
    if not os.path.exists("checkpoint_max_val_acc1.pth"):  # a SpikingJelly-layout SEW-ResNet-18 checkpoint
        save_spikingjelly(models.sew_resnet18(cnf="ADD"), "checkpoint_max_val_acc1.pth")
    images, labels = torch.rand(6, 1, 8, 8), torch.arange(6) % 3
    weights = [torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(16, requires_grad=True)]
    for w in weights:
        w.grad = torch.zeros_like(w)
    conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.sign(torch.randn_like(conv.weight)) * 0.5)
    spikes = (torch.rand(2, 8, 6, 6) < 0.3).float()
    return dict(
        # a model, its data and its loss / evaluation
        model=_TinySpikingNet(), build_my_model=_TinySpikingNet, train_loader=[(images, labels)], loader=[(images, labels)],
        loss_fn=lambda out, y: F.cross_entropy(out.mean(0) if out.dim() == 3 else out, y),
        evaluate=lambda m: 0.0, ann=digits_cq_ann(16, num_classes=3),
        spikingjelly_model=_sj_model(),
        # the ops' operands
        w=torch.randn(8, 4, 3, 3), scale=0.5, weights=weights, lambdas=[torch.zeros_like(w) for w in weights],
        scales=[0.5, 1.0], g=2.0, conv=conv, spikes=spikes, spikes_nhwc=spikes.permute(0, 2, 3, 1),
        w_q=conv.weight.detach(), bias=torch.zeros(4), stride=1, padding=1,
    )


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3, "the parser found no README code: the test below would check nothing"


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.getbasetemp())  # shared: the checkpoint stand-in is written once
    namespace = stand_ins()
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102  (the README's own code)
