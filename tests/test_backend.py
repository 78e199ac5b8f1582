"""The defensive loading of the compiled extension and ``cbp_kernels.backends()``."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from conftest import HANG_GUARD_S

import cbp_kernels


def test_backends_report_this_machine():
    table = cbp_kernels.backends()
    assert set(table) == {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    assert table["cpu"]["reference"] is True
    assert table["cpu"]["cuda"] is False  # CUDA kernels never run on CPU tensors
    assert set(table["cpu"]) == set(cbp_kernels.BACKENDS)


def test_import_and_ops_work_without_the_extension_and_say_so_once():
    """With ``cbp_kernels._C`` unimportable the package imports, reports no compiled kernel,
    and each op falls back to its reference with ONE warning."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["cbp_kernels._C"] = None          # makes `from cbp_kernels import _C` fail
        import torch, cbp_kernels
        from cbp_kernels.ops import multistep_neuron
        assert cbp_kernels.backends()["cpu"]["cpu"] is False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                spikes, _ = multistep_neuron(torch.randn(4, 10))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "using the reference backend" in messages[0], messages
        assert spikes.shape == (4, 10)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
