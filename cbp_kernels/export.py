"""Export of a CBP-quantized model as packed popcount layers, in one safetensors file.

``save_packed(model, path, layers=..., arch=...)`` stores, for every quantized layer
``name``, its bit planes ``name.planes`` (int32, the packed weight format of
``cbp_kernels.ops.bitconv``: 1 bit per binary weight, 2 per ternary weight) and its scale
``name.scale`` (float32, 0-dim); every other tensor of the model's state dict (the FP32
first / last layers, biases, BatchNorm, neuron parameters) as it is; and as metadata the
architecture (a model name and its constructor keyword arguments), each packed layer's
level set and weight shape, and free-form user metadata (JSON strings).

``load_packed(path)`` rebuilds the architecture, loads the FP32 tensors and replaces every
quantized layer by ``PackedConv2d`` / ``PackedLinear`` (``.from_float`` of the layer holding
the unpacked weights), so the loaded model predicts exactly what the saved one did.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

__all__ = ["save_packed", "load_packed", "read_metadata", "pack_model", "build_architecture", "architectures",
           "atomic_write", "FORMAT", "PACKABLE"]

FORMAT = "cbp_kernels.packed/1"
# Level sets the packed layers run (cbp_kernels.ops.bitconv's format), by their values.
PACKABLE = {(-1.0, 1.0): "binary", (-1.0, 0.0, 1.0): "ternary"}
# State-dict entries of a quantized layer that its planes + scale replace.
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
        raise ValueError(f"unknown model {name!r}; library models: {sorted(builders)}")
    return builders[name](**arch.get("kwargs", {}))


def _levels_name(layer: nn.Module, name: str) -> str:
    values = tuple(float(v) for v in layer.levels.tolist())
    if values not in PACKABLE:
        raise ValueError(f"layer {name!r} has levels {list(values)}: only binary {{-1, 1}} and ternary {{-1, 0, 1}} "
                         f"weights pack into popcount layers")
    return PACKABLE[values]


def pack_model(model: nn.Module, layers: dict[str, str | None]) -> nn.Module:
    """Replaces, in place, each layer named in ``layers`` (a quantized layer or a float one,
    its weights on the levels, e.g. after ``CBPQuantizer.finalize()``) by
    ``PackedConv2d`` / ``PackedLinear.from_float(layer, levels)``; ``layers`` maps each name
    to ``"binary"`` / ``"ternary"`` (None: taken from the layer). Returns ``model``."""
    from .nn import LIFConv2d, PackedConv2d, PackedLinear

    for name, levels in layers.items():
        layer = model.get_submodule(name)
        if isinstance(layer, LIFConv2d):  # its BN and neuron go along: LIFConv2d.pack()
            model.set_submodule(name, layer.pack(levels or _levels_name(layer, name)))
            continue
        if any(True for _ in layer.children()):  # a bare packed conv would drop them
            children = [n for n, _ in layer.named_children()]
            raise NotImplementedError(f"layer {name!r} ({type(layer).__name__}) holds submodules {children}: "
                                      f"only Conv2d / Linear / LIFConv2d layers pack")
        cls = PackedConv2d if isinstance(layer, nn.Conv2d) else PackedLinear
        model.set_submodule(name, cls.from_float(layer, levels))
    return model


def save_packed(model: nn.Module, path: str | os.PathLike, *, layers: list[str], arch: dict,
                metadata: dict | None = None) -> None:
    """Saves ``model`` (float, its quantized ``layers`` finalized onto binary / ternary
    levels) as packed planes + scales + the other tensors + metadata (see the module
    docstring), atomically. ``arch``: ``{"name", "kwargs"}`` that ``build_architecture``
    rebuilds the model from; ``metadata``: JSON-serialisable, returned by ``read_metadata``.

    Raises ValueError when a layer's weights are not on its binary / ternary levels."""
    from safetensors.torch import save

    from .ops.bitconv import pack_weight

    tensors, packed = {}, {}
    for name in layers:
        layer = model.get_submodule(name)
        levels = _levels_name(layer, name)
        pw = pack_weight(layer.weight.detach().float(), levels, float(layer.weight_scale))
        tensors[f"{name}.planes"] = pw.planes.cpu().contiguous()
        tensors[f"{name}.scale"] = torch.tensor(pw.scale, dtype=torch.float32)
        packed[name] = {"levels": levels, "shape": list(pw.shape)}
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
    if header.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a cbp_kernels packed model (format {header.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return tensors, header


def read_metadata(path: str | os.PathLike) -> dict:
    """The user metadata given to ``save_packed`` (plus ``arch`` and ``packed``: the layers)."""
    _, header = _read(path)
    return {**json.loads(header["metadata"]), "arch": json.loads(header["arch"]),
            "packed": json.loads(header["packed"])}


def load_packed(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved by ``save_packed``, its quantized layers as ``PackedConv2d`` /
    ``PackedLinear``, in eval mode on ``device``. Raises ValueError / FileNotFoundError
    naming the file for a missing, foreign or inconsistent file."""
    from .ops.bitconv import PackedWeight, unpack_weight

    tensors, header = _read(path)
    arch, packed = json.loads(header["arch"]), json.loads(header["packed"])
    model = build_architecture(arch)
    weights = {}
    for name, info in packed.items():
        pw = PackedWeight(tensors.pop(f"{name}.planes"), float(tensors.pop(f"{name}.scale")), tuple(info["shape"]),
                          info["levels"])
        weights[name] = unpack_weight(pw)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(missing) - {f"{name}.weight" for name in packed})
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)!r} does not fit {arch['name']}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    return pack_model(model, {name: info["levels"] for name, info in packed.items()}).to(device).eval()
