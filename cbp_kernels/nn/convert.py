"""``convert(model)``: swaps a SpikingJelly model's layers for cbp_kernels' in place.

- every ``layer.Conv2d -> layer.BatchNorm2d -> neuron.{IF,LIF,ParametricLIF}Node`` chain in
  multi-step mode becomes one ``LIFConv2d`` (the conv's slot; the BN and neuron slots become
  ``nn.Identity``), and a ``Conv2d -> BatchNorm2d`` chain with no neuron after it a
  ``LIFConv2d(neuron=None)``;
- every other IF / LIF / ParametricLIF node becomes ``cbp_kernels.nn.IF / LIF / PLIF``.

A chain is fused only when the data flow proves it: the model is traced with ``torch.fx``
(layers and neurons as leaves) and the conv's output must feed only the BN, the BN's only the
neuron, each module called once. When the model cannot be traced, only chains inside
``nn.Sequential`` containers (whose order is their data flow) are fused. Weights, BN
statistics and PLIF time constants are copied.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .lifconv import LIFConv2d
from .neuron import IF, LIF, PLIF

__all__ = ["convert"]


def _sj():
    try:
        from spikingjelly.activation_based import base, layer, neuron  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("convert() needs spikingjelly (pip install --no-deps spikingjelly)") from e
    return base, layer, neuron


def _neuron_kind(module):
    _, _, neuron = _sj()
    for cls, kind in ((neuron.ParametricLIFNode, "plif"), (neuron.LIFNode, "lif"), (neuron.IFNode, "if")):
        if type(module) is cls:
            return kind
    return None


def _neuron_from_sj(sn, step_mode: str, backend: str) -> nn.Module:
    """Our IF / LIF / PLIF with the SpikingJelly neuron's settings (and PLIF's learned w)."""
    kind = _neuron_kind(sn)
    common = dict(v_threshold=float(sn.v_threshold), v_reset=None if sn.v_reset is None else float(sn.v_reset),
                  surrogate_function=sn.surrogate_function, detach_reset=bool(sn.detach_reset),
                  step_mode=step_mode, backend=backend, store_v_seq=bool(getattr(sn, "store_v_seq", False)))
    if kind == "if":
        return IF(**common)
    if kind == "lif":
        return LIF(tau=float(sn.tau), decay_input=bool(sn.decay_input), **common)
    ours = PLIF(decay_input=bool(sn.decay_input), **common)
    with torch.no_grad():
        ours.w.copy_(sn.w.detach().reshape(()))
    return ours


def _lifconv_from_sj(conv, bn, sn, backend: str, compact_spikes: bool) -> LIFConv2d:
    lif = LIFConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, bias=conv.bias is not None, bn=False,
                    neuron=None if sn is None else _neuron_from_sj(sn, "m", backend),
                    compact_spikes=compact_spikes, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lif.weight.copy_(conv.weight)
        if conv.bias is not None:
            lif.bias.copy_(conv.bias)
    new_bn = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                            device=conv.weight.device, dtype=conv.weight.dtype)
    new_bn.load_state_dict(bn.state_dict())
    lif.bn = new_bn
    lif.train(conv.training)
    return lif


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        base, _, _ = _sj()
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d, base.StepModule)) or super().is_leaf_module(m, qualname)


def _chains_from_graph(model, is_conv, is_bn, is_neuron):
    graph = _LeafTracer().trace(model)
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    single = {name: nodes[0] for name, nodes in calls.items() if len(nodes) == 1}
    chains = []
    for name, node in single.items():
        if not is_conv(model.get_submodule(name)) or len(node.users) != 1:
            continue
        bn_node = next(iter(node.users))
        if (bn_node.op != "call_module" or bn_node.target not in single
                or not is_bn(model.get_submodule(bn_node.target))):
            continue
        sn_name = None
        if len(bn_node.users) == 1:
            sn_node = next(iter(bn_node.users))
            if (sn_node.op == "call_module" and sn_node.target in single
                    and is_neuron(model.get_submodule(sn_node.target))):
                sn_name = sn_node.target
        chains.append((name, bn_node.target, sn_name))
    return chains


def _chains_from_sequentials(model, is_conv, is_bn, is_neuron):
    chains = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for i in range(len(names) - 1):
            conv, bn = seq[i], seq[i + 1]
            if is_conv(conv) and is_bn(bn):
                sn = names[i + 2] if i + 2 < len(names) and is_neuron(seq[i + 2]) else None
                full = (lambda n: f"{prefix}.{n}" if prefix else n)
                chains.append((full(names[i]), full(names[i + 1]), None if sn is None else full(sn)))
    return chains


def _set(model: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def convert(model: nn.Module, *, backend: str = "auto", compact_spikes: bool = True) -> nn.Module:
    """Replaces SpikingJelly layers of ``model`` in place (see the module docstring); returns it.

    Args:
        model: any ``nn.Module`` holding SpikingJelly ``layer.Conv2d`` / ``layer.BatchNorm2d``
            / ``neuron.IFNode`` / ``LIFNode`` / ``ParametricLIFNode`` modules. Conv chains are
            fused only in multi-step mode (``step_mode="m"``); lone neurons keep their mode.
        backend: the neuron op's backend for the new layers.
        compact_spikes: ``LIFConv2d``'s bit-packed saving of spikes.
    """
    _, layer, _ = _sj()

    def is_conv(m):
        return isinstance(m, layer.Conv2d) and m.step_mode == "m" and m.padding_mode == "zeros" \
            and not isinstance(m.padding, str)

    def is_bn(m):
        return isinstance(m, layer.BatchNorm2d) and m.step_mode == "m"

    def is_neuron(m):
        return _neuron_kind(m) is not None and m.step_mode == "m"

    try:
        chains = _chains_from_graph(model, is_conv, is_bn, is_neuron)
    except Exception:  # noqa: BLE001 - any untraceable forward: fall back to the safe subset
        chains = _chains_from_sequentials(model, is_conv, is_bn, is_neuron)
    for conv_name, bn_name, sn_name in chains:
        sn = None if sn_name is None else model.get_submodule(sn_name)
        lif = _lifconv_from_sj(model.get_submodule(conv_name), model.get_submodule(bn_name), sn, backend,
                               compact_spikes)
        _set(model, conv_name, lif)
        _set(model, bn_name, nn.Identity())
        if sn_name is not None:
            _set(model, sn_name, nn.Identity())
    for name, m in list(model.named_modules()):
        if name and _neuron_kind(m) is not None:
            _set(model, name, _neuron_from_sj(m, m.step_mode, backend))
    return model
