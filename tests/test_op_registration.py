"""Every public op is ONE torch.library custom op (``cbp_kernels::<op>``, schema written once
in its ``op.py``): ``torch.library.opcheck`` (schema, fake tensor, autograd registration,
dynamic shapes) on each backend of this machine, and the public function under
``torch.compile(fullgraph=True)`` equal to its eager result. The ops' numerics are tested
in their own files (test_neuron.py, test_constraint.py, test_bitconv.py, ...)."""
from __future__ import annotations

import pytest
import torch

from cbp_kernels.ops import (bitpack, bitunpack, constraint_pass, multiplier_step, multistep_neuron, pack_spikes,
                             pack_weight, packed_conv2d, packed_conv2d_lif, quantize)
from cbp_kernels.ops.constraint import reference as constraint_ref
from cbp_kernels.ops.conv_weight_grad import conv_weight_grad  # noqa: F401  (registers its op)
from cbp_kernels.ops.neuron.params import NeuronParams
from cbp_kernels.ops.sigmoid_quant.op import sigmoid_quantize

from conftest import kernel_backends

TERNARY = torch.tensor([-1.0, 0.0, 1.0])


def _spikes(*shape) -> torch.Tensor:
    return (torch.rand(*shape) > 0.5).float()


def _neuron_args(backend: str) -> tuple:
    x = torch.randn(3, 5, requires_grad=True)
    p = NeuronParams(1.0, None, 1, True, False, 3, 1.0)  # soft reset, triangle surrogate
    return (x, torch.zeros(5), torch.tensor(0.5), *p.fields(), backend)


def _neuron_backward_args(backend: str) -> tuple:
    x, v0, k, *fields, _ = _neuron_args(backend)
    from cbp_kernels.ops.neuron.op import _neuron_forward

    s, _, h = _neuron_forward(x.detach(), v0, k, *fields, backend)
    return (torch.randn(3, 5), torch.randn(5), h, s, x.detach(), v0, k, *fields, backend, True)


def _table(levels=TERNARY, scales=(0.5, 0.25), g=2.0) -> torch.Tensor:
    return constraint_ref.level_table(levels, torch.tensor(scales), g)


def _constraint_args(backend: str) -> tuple:
    weights = [torch.randn(5), torch.randn(4, 17)]
    lambdas = [torch.rand_like(w) for w in weights]
    grads, lambda_grads = [torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights]
    return (weights, lambdas, _table(), grads, lambda_grads, backend)


def _multiplier_args(backend: str) -> tuple:
    weights = [torch.randn(5), torch.randn(4, 17)]
    state = [[torch.rand_like(w) for w in weights] for _ in range(3)]
    scalars = constraint_ref.adam_scalars(2, 0.01, (0.9, 0.999), 1e-8, 0.01, True)
    return (weights, *state, _table(), scalars, backend)


def _conv_inputs():
    x = pack_spikes(_spikes(4, 3, 4, 40))  # [T*N, H, W, words], T = 2 (small: the Triton interpreter is slow)
    w = pack_weight(torch.randint(-1, 2, (32, 40, 3, 3)).float() * 0.5, "ternary", 0.5)
    return x, w


def _bitconv_args(backend: str) -> tuple:
    x, w = _conv_inputs()
    return (x, w.planes, 0.5, torch.randn(32), [1, 1], [1, 1], [1, 1], 1, backend)


def _bitconv_lif_args(backend: str) -> tuple:
    x, w = _conv_inputs()
    p = NeuronParams(1.0, 0.0, 1, True)
    return (x, w.planes, torch.rand(32), torch.randn(32), [2, 1], [1, 0], [1, 1], 1, 2, 0.5, *p.fields(), backend)


def _sigmoid_args(backend: str) -> tuple:
    from cbp_kernels.ops.sigmoid_quant.op import level_table

    gaps, mids, offset = level_table([-1.0, 0.0, 1.0])
    w = torch.randn(4, 9, requires_grad=True)
    alpha, beta = torch.tensor(0.7, requires_grad=True), torch.tensor(1.3, requires_grad=True)
    return (w, alpha, beta, gaps, mids, offset, 5.0, backend)


def _sigmoid_backward_args(backend: str) -> tuple:
    w, alpha, beta, *rest = _sigmoid_args(backend)
    return (torch.randn(4, 9), w.detach(), alpha.detach(), beta.detach(), *rest)


def _batch_norm_stats_args(backend: str) -> tuple:
    return (torch.randn(3, 10, 4, 5), torch.zeros(10), torch.ones(10), 0.1, 1e-5, backend)


def _max_pool_backward_args(backend: str) -> tuple:
    from cbp_kernels.ops.max_pool import max_pool2d_3x3s2

    _, argmax = max_pool2d_3x3s2(torch.randn(6, 9, 12), backend="reference")
    return (torch.randn(argmax.shape), argmax, 9, 12, backend)


# op name (the custom op cbp_kernels::<name>, its C++ kernels cbp_kernels_ext::<name>) ->
# (its package, opcheck's args for a backend). The neuron and sigmoid-sum ops with
# backend="reference" run as plain PyTorch (the reference's own autograd, float64 gradcheck),
# not through the custom op: their cases start at "cpu".
OPS = {
    "neuron_forward": ("cbp_kernels.ops.neuron", _neuron_args),
    "neuron_backward": ("cbp_kernels.ops.neuron", _neuron_backward_args),
    "constraint_quantize": ("cbp_kernels.ops.constraint",
                            lambda b: (torch.randn(9, 4, requires_grad=True), _table(scales=(0.5,)), b)),
    "constraint_pass": ("cbp_kernels.ops.constraint", _constraint_args),
    "constraint_multiplier_step": ("cbp_kernels.ops.constraint", _multiplier_args),
    "bitpack": ("cbp_kernels.ops.bitpack", lambda b: (_spikes(2, 40, 3).transpose(1, 2), b)),  # strided
    "bitunpack": ("cbp_kernels.ops.bitpack", lambda b: (bitpack(_spikes(6, 40)), 40, torch.float16, b)),
    "bitconv2d": ("cbp_kernels.ops.bitconv", _bitconv_args),
    "bitconv2d_lif": ("cbp_kernels.ops.bitconv", _bitconv_lif_args),
    "sigmoid_quant_forward": ("cbp_kernels.ops.sigmoid_quant", _sigmoid_args),
    "sigmoid_quant_backward": ("cbp_kernels.ops.sigmoid_quant", _sigmoid_backward_args),
    "batch_norm_stats": ("cbp_kernels.ops.batch_norm_stats", _batch_norm_stats_args),
    "max_pool2d_3x3s2": ("cbp_kernels.ops.max_pool", lambda b: (torch.randn(6, 9, 12), b)),
    "max_pool2d_3x3s2_backward": ("cbp_kernels.ops.max_pool", _max_pool_backward_args),
    "plane_sum_nchw": ("cbp_kernels.ops.plane_sum", lambda b: (
        torch.randint(-9, 10, (6, 5, 7, 17)).float(), 2, torch.tensor(0.37), b)),
    "conv_input_grad": ("cbp_kernels.ops.conv_input_grad", lambda b: (
        torch.randn(2, 6, 5, 5), torch.randint(-1, 2, (6, 4, 3, 3)).float() * 0.37, [9, 9], [2, 2], [1, 1], 0.5, True,
        b)),
    "conv2d_integer_input": ("cbp_kernels.ops.conv_input_grad", lambda b: (
        torch.randint(0, 2, (2, 4, 7, 9)).float(), torch.randn(6, 4, 3, 3), [1, 0], b)),
    "conv_weight_grad": ("cbp_kernels.ops.conv_weight_grad", lambda b: (
        torch.randn(2, 20, 4, 5), torch.randint(0, 3, (2, 3, 7, 9)).float(), [3, 3], [2, 2], [1, 1], b)),
}
PLAIN_REFERENCE = {"neuron_forward", "neuron_backward", "sigmoid_quant_forward", "sigmoid_quant_backward"}
# Ops with a CPU kernel only (ATen's CPU arithmetic reproduced bit for bit; CUDA keeps ATen's op).
CPU_ONLY = {"batch_norm_stats", "max_pool2d_3x3s2", "max_pool2d_3x3s2_backward", "conv_input_grad", "conv2d_integer_input",
            "conv_weight_grad", "plane_sum_nchw"}


def _cases():
    for name, (package, _) in OPS.items():
        kernels = ["cpu"] if name in CPU_ONLY else kernel_backends("cpu", name, package)
        for backend in ([] if name in PLAIN_REFERENCE else ["reference"]) + kernels:
            yield pytest.param(name, backend, id=f"{name}-{backend}")


def test_every_custom_op_is_listed():
    """A new op registered under cbp_kernels:: without a case here fails this test, and every
    custom op has its C++ kernel under the same name (cbp_kernels_ext::<name>)."""
    import cbp_kernels.ops.batch_norm_stats  # noqa: F401  (registers its op)
    import cbp_kernels.ops.conv_input_grad  # noqa: F401  (registers its ops)
    import cbp_kernels.ops.max_pool  # noqa: F401  (registers its op)
    import cbp_kernels.ops.plane_sum  # noqa: F401  (registers its op)
    import cbp_kernels.ops.sigmoid_quant  # noqa: F401  (registers its ops)

    registered = {name for name in dir(torch.ops.cbp_kernels) if not name.startswith("_")
                  and isinstance(getattr(torch.ops.cbp_kernels, name), torch._ops.OpOverloadPacket)}
    assert registered == set(OPS)
    assert all(hasattr(torch.ops.cbp_kernels_ext, name) for name in OPS)


@pytest.mark.parametrize("name,backend", list(_cases()))
def test_opcheck(name, backend):
    _, make_args = OPS[name]
    torch.library.opcheck(getattr(torch.ops.cbp_kernels, name).default, make_args(backend))


def test_neuron_params_cross_the_op_boundary_whole():
    """The custom ops take NeuronParams' fields in order and rebuild it with NeuronParams(*fields):
    the identity for every field (the soft reset's None included)."""
    for p in (NeuronParams(), NeuronParams(0.7, None, 0, False, True, 4, 0.3), NeuronParams(1.5, -0.2, 1, True, False, 2, 3.0)):
        assert NeuronParams(*p.fields()) == p


def _compiled_equals_eager(fn, *inputs, loss=None):
    """fn compiled with fullgraph=True (a graph break is an error) gives fn's outputs and, with
    ``loss(outputs)``, the same gradients of the inputs that require them."""
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (compiled, fn):
        leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        out = f(*leaves)
        if loss is not None:
            loss(out).backward()
        results.append((out, [x.grad for x in leaves if x.requires_grad]))
    for g, w in zip(torch.utils._pytree.tree_leaves(results[0]), torch.utils._pytree.tree_leaves(results[1])):
        assert torch.equal(g, w)


def test_compile_neuron_forward_and_backward():
    x = torch.randn(4, 3, 8, requires_grad=True)
    fn = lambda x: multistep_neuron(x * 2, neuron="lif", v_reset=None, surrogate="sigmoid")  # noqa: E731
    _compiled_equals_eager(fn, x, loss=lambda out: (out[0] * torch.arange(8.0)).sum() + out[1].sum())


def test_compile_constraint_ops():
    w = torch.randn(6, 5)
    lam = torch.rand(6, 5)

    def step(w, lam):
        q = quantize(w, TERNARY, 0.5)
        lambda_grad, m, v = torch.zeros_like(lam), torch.zeros_like(lam), torch.zeros_like(lam)
        sums = constraint_pass([w], [lam], TERNARY, torch.tensor([0.5]), 2.0, lambda_grads=[lambda_grad])
        lam = lam.clone()
        multiplier_step([w], [lam], [m], [v], TERNARY, torch.tensor([0.5]), 2.0, step=1, lr=0.1)
        return q, sums, lambda_grad, lam, m, v

    _compiled_equals_eager(step, w, lam)


def test_compile_bit_ops():
    x, w = _conv_inputs()

    def layers(spikes_nhwc):
        words = bitpack(spikes_nhwc, -1)
        y = packed_conv2d(words, w, None, 1, 1)
        s, v = packed_conv2d_lif(words, w, 2, None, None, 1, 1, tau=1.5)
        return y, s, v, bitunpack(s, -1, 32)

    _compiled_equals_eager(layers, _spikes(4, 3, 4, 40))


def test_compile_sigmoid_quant():
    w, alpha, beta = torch.randn(4, 9, requires_grad=True), torch.tensor(0.7), torch.tensor(1.3, requires_grad=True)
    fn = lambda w, alpha, beta: sigmoid_quantize(w, alpha, beta, [-1.0, 0.0, 1.0], 5.0)  # noqa: E731
    _compiled_equals_eager(fn, w, alpha, beta, loss=lambda y: (y * y).sum())


def test_compile_max_pool():
    from cbp_kernels.ops.max_pool import max_pool2d_3x3s2, max_pool2d_3x3s2_backward

    _compiled_equals_eager(max_pool2d_3x3s2, torch.randn(2, 3, 9, 12))
    _, argmax = max_pool2d_3x3s2(torch.randn(2, 3, 9, 12))
    _compiled_equals_eager(lambda g, a: max_pool2d_3x3s2_backward(g, a, 9, 12), torch.randn(argmax.shape), argmax)


def test_compile_plane_sum():
    from cbp_kernels.ops.plane_sum import plane_sum_nchw

    _compiled_equals_eager(lambda c, s: plane_sum_nchw(c, 2, s), torch.randint(-9, 10, (6, 5, 7, 17)).float(),
                           torch.tensor(0.37))


def test_compile_batch_norm_stats():
    from cbp_kernels.ops.batch_norm_stats import batch_norm_stats

    def stats(x, running_mean, running_var):
        return batch_norm_stats(x, running_mean, running_var, 0.1, 1e-5)

    _compiled_equals_eager(stats, torch.randn(3, 10, 4, 5), torch.zeros(10), torch.ones(10))
