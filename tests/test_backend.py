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


def test_extension_schemas_declare_what_the_kernels_write():
    """The C++ ops' schemas are inferred from csrc/common/<op>_api.h (csrc/register.cpp): opcheck's
    schema test runs each CPU kernel and fails when it writes an argument its schema does not
    mark (a!), or returns an alias of one; and the arguments so marked are the ones written."""
    import cbp_kernels._C  # noqa: F401  (loading the extension registers its ops)
    from cbp_kernels.ops.constraint import reference as constraint_ref

    ext = torch.ops.cbp_kernels_ext
    spikes = (torch.rand(2, 40, 3) < 0.5).float().transpose(1, 2)  # [B, R, C] strided
    x = torch.randint(-2**31, 2**31 - 1, (4, 5, 5, 1), dtype=torch.int32)
    planes = torch.randint(-2**31, 2**31 - 1, (1, 32, 3, 3, 1), dtype=torch.int32)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    weights = [torch.randn(5), torch.randn(3, 4)]
    table = constraint_ref.level_table(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.5, 0.25]), 2.0)
    scalars = constraint_ref.adam_scalars(2, 0.01, (0.9, 0.999), 1e-8, 0.01, True)
    fresh = lambda: [torch.rand_like(w) for w in weights]  # noqa: E731
    seq = torch.randn(4, 6)
    one = torch.ones(())
    gaps, mids = torch.tensor([1.0, 1.0]), torch.tensor([-0.5, 0.5])
    calls = {
        "bitpack": (spikes,),
        "bitunpack": (torch.randint(0, 2**31 - 1, (3, 2), dtype=torch.int32), 40, torch.float32),
        "bitconv2d": (x, planes, 0.5, torch.randn(32), *conv),
        "bitconv2d_lif": (x, planes, torch.rand(32), torch.randn(32), *conv, 2, 0.5, 1.0, 0.0, False, 1, True),
        "constraint_pass": (weights, fresh(), table, fresh(), fresh()),
        "constraint_quantize": (weights[1], table[1:]),
        "constraint_multiplier_step": (weights, fresh(), fresh(), fresh(), table, scalars),
        "neuron_forward": (seq, torch.zeros(6), torch.tensor(0.5), 1.0, 0.0, False, 1, True),
        "neuron_backward": (torch.randn(4, 6), torch.randn(6), torch.empty(0), torch.empty(0), seq, torch.zeros(6),
                            torch.tensor(0.5), 1.0, 0.0, False, 1, True, False, 1, 4.0, True),
        "sigmoid_quant_forward": (torch.randn(9), one, one, gaps, mids, 1.0, 3.0),
        "sigmoid_quant_backward": (torch.randn(9), torch.randn(9), one, one, gaps, mids, 1.0, 3.0),
    }
    written = {}
    for name, args in calls.items():
        schema = getattr(ext, name).default._schema
        torch.library.opcheck(getattr(ext, name).default, args, test_utils="test_schema")
        written[name] = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert {n: w for n, w in written.items() if w} == {
        "constraint_pass": ["grads", "lambda_grads"],
        "constraint_multiplier_step": ["lambdas", "exp_avgs", "exp_avg_sqs"],
    }
