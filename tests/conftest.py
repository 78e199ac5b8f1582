"""Shared test helpers: the backends to test on this machine and a verbose allclose."""
from __future__ import annotations

import os

import pytest
import torch

import cbp_kernels

# (atol, rtol) of kernel gradients against the float32 reference, per input dtype.
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def required_backends(device: str) -> list[str]:
    """The kernel backends every op must have on ``device`` in a test run: the compiled CPU
    kernels are part of every build (setup.py), Triton runs on CPU tensors when
    TRITON_INTERPRET=1 (``make test`` sets it), and a GPU build has CUDA kernels and Triton."""
    if device == "cpu":
        return ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    return ["cuda", "triton"]


def kernel_backends(device: str = "cpu", op: str = "neuron_forward", package: str = "cbp_kernels.ops.neuron") -> list[str]:
    """The non-reference backends of an op to test on ``device``: those that run here, and the
    required ones (``required_backends``) even when they do not, so that a broken build fails
    their tests (the op names the missing backend) instead of skipping them. ``op``/``package``
    as in ``cbp_kernels.backends``."""
    avail = cbp_kernels.backends(op, package).get(device, {})
    required = required_backends(device)
    return [b for b in cbp_kernels.BACKENDS if b != "reference" and (avail.get(b) or b in required)]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """allclose that says how many elements differ, the worst one and where."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if bad.any():
        diff = (actual - expected).abs()
        worst = int(diff.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
        pytest.fail(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); worst at {idx}: "
            f"{actual.flatten()[worst].item()} vs {expected.flatten()[worst].item()}"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return f"cbp_kernels backends: {cbp_kernels.backends()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
