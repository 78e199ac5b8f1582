"""Data sets for ``cbp-quantize``: the embedded digits default and the formats users know.

Every data set here is a ``torch.utils.data.Dataset`` of ``(x, label)`` pairs with
attributes ``num_classes`` (int), ``timesteps`` (int: T of the model input) and
``static`` (bool). A static data set (images) yields ``x`` of shape ``[C, H, W]`` float32,
repeated over T timesteps as direct input current by :func:`time_major`; an event data
set (DVS frames) yields ``x`` of shape ``[T, C, H, W]`` float32. ``label`` is an int.

``get_dataset(name, root, split, timesteps)`` is the registry the CLI calls:

========================  =============================================================
name                      root
========================  =============================================================
``digits``                none (scikit-learn's bundled 8x8 digits, no download)
``imagefolder``           ``root/train/<class>/<image>`` and ``root/val/<class>/...``
``cifar10``/``cifar100``  the python-pickle batches (``cifar-10-batches-py``, ...)
``dvs-gesture``           SpikingJelly's ``DVS128Gesture`` root (frames, T=16; its integrated
                          frames are read directly, SpikingJelly builds them when missing)
``cifar10-dvs``           SpikingJelly's ``CIFAR10DVS`` root (the same, 9:1 split per class)
``npz``                   ``root/{train,test}.npz`` (or one file) with ``frames`` [N,T,C,H,W]
                          and ``labels`` [N]
========================  =============================================================
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from .cifar import cifar_dataset
from .digits import DigitsDataset
from .dvs import dvs_dataset, npz_dataset
from .imagefolder import ImageFolderDataset

__all__ = ["DATASETS", "SPLITS", "get_dataset", "time_major", "DigitsDataset", "ImageFolderDataset"]

SPLITS = ("train", "test")


def _digits(root, split, timesteps, **options):
    if root is not None:
        raise ValueError("data set 'digits' is embedded (scikit-learn's load_digits): give no data path")
    return DigitsDataset(split, timesteps if timesteps is not None else 4, **options)


def _needs_root(name: str, build: Callable) -> Callable:
    def make(root, split, timesteps, **options):
        if root is None:
            raise ValueError(f"data set {name!r} needs a data path (--data-path)")
        return build(root, split, timesteps, **options)
    return make


# name -> build(root, split, timesteps, **options) -> Dataset
DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "imagefolder": _needs_root("imagefolder",
                               lambda r, s, t, **o: ImageFolderDataset(r, s, t if t is not None else 4, **o)),
    "cifar10": _needs_root("cifar10", lambda r, s, t, **o: cifar_dataset(r, s, t, num_classes=10, **o)),
    "cifar100": _needs_root("cifar100", lambda r, s, t, **o: cifar_dataset(r, s, t, num_classes=100, **o)),
    "dvs-gesture": _needs_root("dvs-gesture", lambda r, s, t, **o: dvs_dataset("dvs-gesture", r, s, t, **o)),
    "cifar10-dvs": _needs_root("cifar10-dvs", lambda r, s, t, **o: dvs_dataset("cifar10-dvs", r, s, t, **o)),
    "npz": _needs_root("npz", npz_dataset),
}


def get_dataset(name: str, root: str | None = None, split: str = "train", timesteps: int | None = None,
                **options) -> Dataset:
    """The ``split`` (``"train"`` or ``"test"``) of data set ``name`` read from ``root``.

    ``timesteps``: T of the model input; ``None`` takes the data set's default (4 for
    static images, the frame count for event data). Event data stored with another T
    is refused. ``options`` go to the loader (e.g. ``image_size`` for ``imagefolder``,
    ``augment`` for images). Errors name the data set, the argument or the file at fault.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if timesteps is not None and (not isinstance(timesteps, int) or timesteps < 1):
        raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
    return DATASETS[name](root, split, timesteps, **options)


def time_major(x: torch.Tensor, timesteps: int) -> torch.Tensor:
    """A batch as the model input ``[T, N, C, H, W]``.

    ``x``: ``[N, C, H, W]`` (static: repeated over ``timesteps`` as direct input current,
    a broadcast view, no copy) or ``[N, T, C, H, W]`` (event frames: transposed).
    """
    if x.dim() == 4:
        return x.unsqueeze(0).expand(timesteps, *x.shape)
    if x.dim() == 5:
        if x.shape[1] != timesteps:
            raise ValueError(f"batch has {x.shape[1]} timesteps, the model expects {timesteps}")
        return x.transpose(0, 1)
    raise ValueError(f"a batch must be [N, C, H, W] or [N, T, C, H, W], got shape {tuple(x.shape)}")
