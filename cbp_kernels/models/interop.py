"""Checkpoint interoperability of the ResNets (``SEWResNet``) with SpikingJelly and with the
original SEW-ResNet repository (fangwei123456/Spike-Element-Wise-ResNet, ImageNet).

Three key layouts of the same tensors (SEW-ResNet-18 shown):

=====================================  ==============================  ===========================
original repository                    SpikingJelly ``sew_resnet18``   cbp_kernels ``SEWResNet``
=====================================  ==============================  ===========================
``conv1.weight``, ``bn1.*``            the same                        ``conv1.weight``, ``conv1.bn.*``
``layer1.0.conv1.module.0.weight``     ``layer1.0.conv1.weight``       ``layer1.0.conv1.weight``
``layer1.0.conv1.module.1.*``          ``layer1.0.bn1.*``              ``layer1.0.conv1.bn.*``
``layer2.0.downsample.0.module.0.*``   ``layer2.0.downsample.0.*``     ``layer2.0.downsample.weight``
``layer2.0.downsample.0.module.1.*``   ``layer2.0.downsample.1.*``     ``layer2.0.downsample.bn.*``
``fc.*``                               ``fc.*``                        ``fc.*``
=====================================  ==============================  ===========================

The original repository's spiking ResNet has ``downsample.module.{0,1}`` (no neuron), and its
checkpoints are ``{"model": state_dict, "optimizer": ...}``, possibly with DDP's ``module.``
prefix on every key; both are handled. Neuron parameters (PLIF's ``w``) map between
``snK.w`` / ``downsample_sn.w`` (SpikingJelly) and ``convK.neuron.w`` / ``downsample.neuron.w``.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["CheckpointError", "to_spikingjelly", "load_checkpoint", "save_spikingjelly", "LAYOUTS"]

LAYOUTS = ("auto", "cbp", "spikingjelly", "original")

# (SpikingJelly pattern, cbp_kernels pattern); applied to whole keys, first match wins.
_SJ_TO_CBP = [
    (r"^(.*\.)?downsample\.0\.weight$", r"\1downsample.weight"),
    (r"^(.*\.)?downsample\.1\.(.+)$", r"\1downsample.bn.\2"),
    (r"^(.*\.)?downsample_sn\.(.+)$", r"\1downsample.neuron.\2"),
    (r"^(.*\.)?bn(\d)\.(.+)$", r"\1conv\2.bn.\3"),
    (r"^((?:.*\.)?layer\d\.\d+\.)sn(\d)\.(.+)$", r"\1conv\2.neuron.\3"),
    (r"^sn1\.(.+)$", r"conv1.neuron.\1"),
]
_CBP_TO_SJ = [
    (r"^(.*\.)?downsample\.weight$", r"\1downsample.0.weight"),
    (r"^(.*\.)?downsample\.bn\.(.+)$", r"\1downsample.1.\2"),
    (r"^(.*\.)?downsample\.neuron\.(.+)$", r"\1downsample_sn.\2"),
    (r"^(.*\.)?conv(\d)\.bn\.(.+)$", r"\1bn\2.\3"),
    (r"^(.*\.)?conv(\d)\.neuron\.(.+)$", r"\1sn\2.\3"),
]
_ORIGINAL_TO_SJ = [
    (r"^(.*\.)conv(\d)\.module\.0\.(.+)$", r"\1conv\2.\3"),
    (r"^(.*\.)conv(\d)\.module\.1\.(.+)$", r"\1bn\2.\3"),
    (r"^(.*\.)downsample\.0\.module\.([01])\.(.+)$", r"\1downsample.\2.\3"),
    (r"^(.*\.)downsample\.module\.([01])\.(.+)$", r"\1downsample.\2.\3"),
]


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every unknown, missing and mis-shaped key."""


def _rename(state: Mapping[str, torch.Tensor], rules, keep=()) -> dict[str, torch.Tensor]:
    """Renames by the first matching rule; keys in ``keep`` (the target model's own) stay."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in ([] if key in keep else rules):
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        if new in out:
            raise CheckpointError(f"keys collide after renaming: {key!r} -> {new!r}")
        out[new] = value
    return out


def _unwrap(checkpoint) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (a path, ``{"model": ...}``, ``{"state_dict": ...}``
    or a state dict), with DDP's ``module.`` prefix removed."""
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{os.fspath(checkpoint)} holds Python objects besides tensors (the original repository "
                "saves its argparse args), which torch.load(weights_only=True) refuses. If you trust the "
                "file, load it yourself with torch.load(path, weights_only=False) and pass the result."
            ) from e
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a checkpoint must be a mapping of names to tensors, got {type(checkpoint).__name__}")
    for wrapper in ("model", "state_dict"):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], Mapping):
            checkpoint = checkpoint[wrapper]
            break
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint entries that are not tensors: {bad[:20]}")
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


def to_spikingjelly(model_or_state) -> dict[str, torch.Tensor]:
    """``SEWResNet`` (or its state dict) -> a state dict SpikingJelly's model loads."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return _rename(state, _CBP_TO_SJ)


def _detect(state: Mapping[str, torch.Tensor]) -> str:
    if any(".module." in k for k in state):
        return "original"
    if any(re.search(r"(^|\.)conv\d\.bn\.", k) for k in state):
        return "cbp"
    return "spikingjelly"


def load_checkpoint(model: nn.Module, checkpoint, layout: str = "auto") -> nn.Module:
    """Loads a checkpoint (path or mapping) of any of the three layouts into ``model``.

    ``layout``: ``"auto"`` (detected from the keys), ``"cbp"``, ``"spikingjelly"`` or
    ``"original"``. Raises ``CheckpointError`` naming every unknown key, missing key and
    shape mismatch at once (a missing BatchNorm ``num_batches_tracked`` is tolerated: older
    checkpoints lack it and it does not change the model's output)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = _unwrap(checkpoint)
    if layout == "auto":
        layout = _detect(state)
    if layout == "original":
        state = _rename(state, _ORIGINAL_TO_SJ)
    expected = model.state_dict()
    if layout in ("original", "spikingjelly"):
        state = _rename(state, _SJ_TO_CBP, keep=set(expected))
    unknown = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unknown or missing or shapes:
        lines = [f"checkpoint ({layout} layout) does not fit {type(model).__name__}:"]
        for title, items in (("unknown keys", unknown), ("missing keys", missing), ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)
    return model


def save_spikingjelly(model: nn.Module, path) -> None:
    """Saves ``model``'s weights in SpikingJelly's layout (``torch.save`` of the state dict)."""
    torch.save(to_spikingjelly(model), path)
