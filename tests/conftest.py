"""Shared test helpers: the backends to test on this machine and a verbose allclose."""
from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

import pytest
import torch

import cbp_kernels

# Subprocess tests wait for their children to finish, not for a deadline: a child's run time on a
# busy 2-core CI machine is unbounded in practice (one DDP test once took > 120 s under load). This
# bound only stops a deadlocked child from hanging CI forever; it is no measure of expected time.
HANG_GUARD_S = 3600


def wait_all(procs) -> list[int]:
    """Waits for every child to finish and returns their exit codes. When one fails, the others
    are killed (a DDP rank would wait for its dead peer until the process group's timeout);
    after ``HANG_GUARD_S`` all are killed."""
    start = time.monotonic()
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() - start > HANG_GUARD_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return [p.returncode for p in procs]

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


# A case on a CUDA device: ``pytest -m gpu`` runs those alone (bench/gpu_session.sh).
gpu = pytest.mark.gpu

# Where SpikingJelly 2.0 is the oracle; collection never imports it (the GPU machine's image lacks it).
needs_spikingjelly = pytest.mark.skipif(
    importlib.util.find_spec("spikingjelly") is None,
    reason="needs spikingjelly 2.0, the oracle here (make setup installs it; bench/gpu_session.sh from .whl/)")


def _cpu_has_amx_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and re.search(r"\bamx_bf16\b", cpuinfo.read_text()) is not None


# Where a test needs the AMX-BF16 tile paths (conv_input_grad, conv_weight_grad) to run.
needs_amx = pytest.mark.skipif(not _cpu_has_amx_bf16(), reason="needs a CPU with AMX-BF16 (Sapphire Rapids or later)")


def devices() -> list:
    """The devices of the op tests: cpu, and cuda (marked ``gpu``) where a CUDA device is present.
    Every tensor a test makes goes on its ``device``."""
    return ["cpu"] + ([pytest.param("cuda", marks=gpu)] if torch.cuda.is_available() else [])


def device_backends(op: str, package: str, reference: bool = False) -> list:
    """``(device, backend)`` parameters: ``kernel_backends`` of each of ``devices()`` (and the
    reference on each where ``reference``), ids ``device-backend``, the cuda ones marked ``gpu``."""
    return [pytest.param(d, b, id=f"{d}-{b}", marks=[gpu] if d == "cuda" else [])
            for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
            for b in (["reference"] if reference else []) + kernel_backends(d, op, package)]


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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: a case on a CUDA device (bench/gpu_session.sh runs pytest -m gpu)")


def pytest_report_header(config):
    return f"cbp_kernels backends: {cbp_kernels.backends()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
