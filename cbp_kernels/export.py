"""Export of a quantized model in one safetensors file: packed popcount layers where the
weights are binary / ternary, integer codes otherwise.

``save_packed(model, path, layers=..., arch=...)`` stores, for every quantized layer
``name`` (a quantizer's layer finalized onto ``scale * Q``, e.g. after
``CBPQuantizer.finalize()``, or a ``LIFConv2d(weight_levels=Q)``: its Q(W); Q the layer's
``levels`` buffer, sorted):

- binary / ternary Q: ``name.planes``, the popcount bit planes of
  ``cbp_kernels.ops.bitconv`` (int32 ``[P, O, KH, KW, Wg]``, packed along the input
  channels, LSB first): binary (P = 1) bit 1 = +1, bit 0 = -1; ternary (P = 2) plane 0 the
  mask of +1, plane 1 the mask of -1;
- any other Q (e.g. ``[-2, -1, 0, 1]``): ``name.codes``, each weight's code k (its index in
  Q: ``w = scale * Q[k]``) in ceil(log2 |Q|) bit planes of the same layout, plane b holding
  bit b of k (``ops.bitconv.pack_codes``);
- ``name.scale`` (float32, 0-dim);

every other tensor of the model's state dict (the FP32 first / last layers, biases,
BatchNorm, neuron parameters) as it is; and as metadata the architecture (a model name and
its constructor keyword arguments, or None for a user's own model), each quantized layer's
level set (``"binary"`` / ``"ternary"`` or its values), storage (``"planes"`` / ``"codes"``)
and weight shape, and free-form user metadata (JSON strings).

``load_packed(path)`` rebuilds the architecture (or takes the user's ``model=``), loads the
FP32 tensors and turns every binary / ternary layer into ``PackedConv2d`` / ``PackedLinear`` /
``PackedLIFConv2d`` built from the stored planes as they are; a layer stored as codes keeps
its float class with the weight ``scale * Q[codes]``. The loaded model predicts exactly what
the saved one did.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .ops.levels import LevelSet

__all__ = ["save_packed", "load_packed", "read_metadata", "pack_model", "build_architecture", "architectures",
           "atomic_write", "FORMAT"]

FORMAT = "cbp_kernels.packed/2"
_READABLE = (FORMAT, "cbp_kernels.packed/1")  # /1: binary / ternary planes only, same keys
# State-dict entries of a quantized layer that its planes / codes + scale replace.
_QUANT_ENTRIES = ("weight", "levels", "weight_scale")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` through a temporary file, fsync and rename: a process
    killed at any moment leaves the old file or the new one, never a torn one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def architectures() -> dict:
    """Model names -> builders: ``digits-net`` and the models of ``cbp_kernels.models``."""
    from . import models

    names = {n: getattr(models, n) for n in models.__all__ if n[0].islower() and callable(getattr(models, n))}
    return {"digits-net": models.DigitsNet, **names}


def build_architecture(arch: dict) -> nn.Module:
    """A fresh model from an architecture record ``{"name": str, "kwargs": dict}``."""
    builders = architectures()
    name = arch.get("name")
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; library models: {sorted(builders)} (for your own "
                         f"architecture, pass model= to load_packed)")
    return builders[name](**arch.get("kwargs", {}))


def _level_set(layer: nn.Module, name: str) -> LevelSet:
    """The level set of a quantized layer (its ``levels`` buffer)."""
    levels = getattr(layer, "levels", None)
    if not isinstance(levels, torch.Tensor):
        raise ValueError(f"layer {name!r} ({type(layer).__name__}) has no levels: quantize it first "
                         f"(e.g. CBPQuantizer, then finalize())")
    return LevelSet(levels)


def _popcount_levels(layer: nn.Module, name: str) -> str:
    levels = _level_set(layer, name)
    if not levels.popcount:
        raise ValueError(f"layer {name!r} has levels {list(levels.values)}: only binary {{-1, 1}} and ternary "
                         f"{{-1, 0, 1}} weights pack into popcount layers")
    return levels.name


def pack_model(model: nn.Module, layers: dict[str, str | None], weights: dict | None = None) -> nn.Module:
    """Replaces, in place, each layer named in ``layers`` (a quantized layer or a float one,
    its weights on the levels, e.g. after ``CBPQuantizer.finalize()``) by
    ``PackedConv2d`` / ``PackedLinear.from_float(layer, levels)`` (``LIFConv2d``: its
    ``pack(levels)``); ``layers`` maps each name to ``"binary"`` / ``"ternary"`` (None: taken
    from the layer). ``weights``: ``PackedWeight`` by layer name, used as they are instead of
    packing the layer's own weight (``load_packed``). Returns ``model``."""
    from .nn import LIFConv2d, PackedConv2d, PackedLinear

    weights = weights or {}
    for name, levels in layers.items():
        layer = model.get_submodule(name)
        packed = weights.get(name)
        if isinstance(layer, LIFConv2d):  # its BN and neuron go along: LIFConv2d.pack()
            levels = levels if levels or packed is not None else _popcount_levels(layer, name)
            model.set_submodule(name, layer.pack(levels, weight=packed))
            continue
        if any(True for _ in layer.children()):  # a bare packed conv would drop them
            children = [n for n, _ in layer.named_children()]
            raise NotImplementedError(f"layer {name!r} ({type(layer).__name__}) holds submodules {children}: "
                                      f"only Conv2d / Linear / LIFConv2d layers pack")
        if packed is None:
            cls = PackedConv2d if isinstance(layer, nn.Conv2d) else PackedLinear
            model.set_submodule(name, cls.from_float(layer, levels))
        elif isinstance(layer, nn.Conv2d):
            model.set_submodule(name, PackedConv2d(packed, layer.bias, tuple(layer.stride), tuple(layer.padding),
                                                   tuple(layer.dilation), layer.groups))
        else:
            model.set_submodule(name, PackedLinear(packed, layer.bias, "auto"))
    return model


def save_packed(model: nn.Module, path: str | os.PathLike, *, layers: list[str], arch: dict | None = None,
                metadata: dict | None = None) -> None:
    """Saves ``model`` (float, its quantized ``layers`` finalized onto their levels) as
    packed planes / codes + scales + the other tensors + metadata (see the module
    docstring), atomically. ``arch``: ``{"name", "kwargs"}`` that ``build_architecture``
    rebuilds the model from, or None for a user's own architecture (``load_packed`` then
    needs ``model=``); ``metadata``: JSON-serialisable, returned by ``read_metadata``.

    Raises ValueError when a layer has no levels or its weights are not on them (nothing
    is written then)."""
    from safetensors.torch import save

    from .nn.quantized import QuantizedLayer
    from .ops.bitconv import pack_codes, pack_weight

    if arch is not None and not (isinstance(arch, dict) and isinstance(arch.get("name"), str)):
        raise ValueError(f"arch must be None or {{'name': str, 'kwargs': dict}}, got {arch!r}")
    tensors, packed = {}, {}
    for name in layers:
        layer = model.get_submodule(name)
        levels = _level_set(layer, name)
        if isinstance(layer, QuantizedLayer) or not hasattr(layer, "quant_scale"):  # finalized onto the levels
            weight, scale = layer.weight.detach(), float(layer.weight_scale)
        else:  # LIFConv2d(weight_levels=...): the Q(W) its forward uses
            weight, scale = layer.quantized_weight().detach(), float(layer.quant_scale())
        if levels.popcount:
            pw = pack_weight(weight.float(), levels, scale)
            tensors[f"{name}.planes"], scale = pw.planes.cpu().contiguous(), pw.scale
        else:
            codes = levels.encode(weight, scale, f"{name}.weight")
            tensors[f"{name}.codes"] = pack_codes(codes, levels.bits).cpu().contiguous()
        tensors[f"{name}.scale"] = torch.tensor(scale, dtype=torch.float32)
        packed[name] = {"levels": levels.name or list(levels.values), "shape": list(weight.shape),
                        "storage": "planes" if levels.popcount else "codes"}
    skip = {f"{name}.{entry}" for name in layers for entry in _QUANT_ENTRIES}
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[key] = value.detach().cpu().contiguous()
    header = {"format": FORMAT, "arch": json.dumps(arch), "packed": json.dumps(packed),
              "metadata": json.dumps(metadata or {})}
    atomic_write(path, save(tensors, metadata=header))


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"packed model {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header: name the file
        raise ValueError(f"cannot read {path!r} as safetensors: {exc}") from exc
    if header.get("format") not in _READABLE:
        raise ValueError(f"{path!r} is not a cbp_kernels packed model (format {header.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return tensors, header


def read_metadata(path: str | os.PathLike) -> dict:
    """The user metadata given to ``save_packed`` (plus ``arch`` and ``packed``: the layers)."""
    _, header = _read(path)
    return {**json.loads(header["metadata"]), "arch": json.loads(header["arch"]),
            "packed": json.loads(header["packed"])}


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu", model: nn.Module | None = None) -> nn.Module:
    """The model saved by ``save_packed``, its binary / ternary layers as ``PackedConv2d`` /
    ``PackedLinear`` / ``PackedLIFConv2d`` (from the stored planes), its code-stored layers
    as float layers with the weight ``scale * Q[codes]``, in eval mode on ``device``.

    ``model``: the architecture to load into (a fresh instance of the saved model's class,
    e.g. a user's own network); default: rebuilt from the saved ``arch``. Raises ValueError /
    FileNotFoundError naming the file for a missing, foreign or inconsistent file."""
    from .ops.bitconv import PackedWeight, unpack_codes

    tensors, header = _read(path)
    arch, packed = json.loads(header["arch"]), json.loads(header["packed"])
    if model is None:
        if arch is None:
            raise ValueError(f"{os.fspath(path)!r} was saved without an architecture: pass model= (an instance "
                             f"of the saved model's class) to load_packed")
        model = build_architecture(arch)
    popcount, decoded = {}, {}
    for name, info in packed.items():
        levels, shape, scale = LevelSet(info["levels"]), tuple(info["shape"]), tensors.pop(f"{name}.scale")
        if info.get("storage", "planes") == "planes":
            popcount[name] = PackedWeight(tensors.pop(f"{name}.planes"), float(scale), shape, levels.name)
        else:
            decoded[name] = (levels, scale, levels.decode(unpack_codes(tensors.pop(f"{name}.codes"), shape), scale))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(missing) - {f"{name}.{entry}" for name in packed for entry in _QUANT_ENTRIES})
    if missing or unexpected:
        what = arch["name"] if arch else type(model).__name__
        raise ValueError(f"{os.fspath(path)!r} does not fit {what}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, (levels, scale, weight) in decoded.items():
            layer = model.get_submodule(name)
            layer.weight.copy_(weight)
            if isinstance(getattr(layer, "levels", None), torch.Tensor):  # it quantizes: onto the same Q and scale
                layer.levels, layer.weight_scale = levels.tensor(weight.device), scale.to(weight.device)
    pack_model(model, {name: pw.levels for name, pw in popcount.items()}, popcount)
    return model.to(device).eval()
