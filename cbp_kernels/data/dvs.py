"""Event data as frames: DVS128 Gesture and CIFAR10-DVS through SpikingJelly's dataset
classes (``data_type="frame"``, ``split_by="number"``, T=16 by default), or any frame
arrays saved as ``.npz`` (``frames`` ``[N, T, C, H, W]``, ``labels`` ``[N]``)."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["FramesDataset", "dvs_dataset", "npz_dataset", "DVS_TIMESTEPS"]

DVS_TIMESTEPS = 16  # the frame count of the paper's DVS runs (Table 4: Steps 16)
# CIFAR10-DVS ships no split: the first 90 % of each class train, as SpikingJelly's split.
_CIFAR10_DVS_TRAIN_RATIO = 0.9


class FramesDataset(Dataset):
    """Frames ``[N, T, C, H, W]`` (any numeric dtype) and labels ``[N]`` held in memory;
    ``x`` is ``[T, C, H, W]`` float32."""

    static = False

    def __init__(self, frames: np.ndarray, labels: np.ndarray, num_classes: int):
        self.frames, self.labels = frames, labels
        self.num_classes, self.timesteps = num_classes, frames.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.asarray(self.frames[i], dtype=np.float32)), int(self.labels[i])


class _SJFrames(Dataset):
    """A SpikingJelly frame data set (or a Subset of one) as ``([T, C, H, W]`` float32, int)."""

    static = False

    def __init__(self, base: Dataset, num_classes: int, timesteps: int):
        self.base, self.num_classes, self.timesteps = base, num_classes, timesteps

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        frames, label = self.base[i]
        return torch.as_tensor(np.asarray(frames, dtype=np.float32)), int(label)


def _read_npz(path: str, timesteps: int | None) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"frame file {path!r} is missing")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("frames", "labels") if k in f.files}
            files = sorted(f.files)
    except Exception as exc:  # not a zip / truncated / pickled objects: name the file whatever numpy raised
        raise ValueError(f"cannot read frame file {path!r} (expected a .npz from numpy.savez): {exc}") from exc
    if len(arrays) != 2:
        raise ValueError(f"frame file {path!r} must hold arrays 'frames' and 'labels'; it has {files}")
    frames, labels = arrays["frames"], arrays["labels"]
    if frames.ndim != 5:
        raise ValueError(f"frame file {path!r}: 'frames' must be [N, T, C, H, W], got shape {frames.shape}")
    if labels.ndim != 1 or len(labels) != len(frames) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"frame file {path!r}: 'labels' must be [N] integers with N = {len(frames)}, "
                         f"got shape {labels.shape} dtype {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"frame file {path!r}: negative label {int(labels.min())}")
    if timesteps is not None and frames.shape[1] != timesteps:
        raise ValueError(f"frame file {path!r} holds T={frames.shape[1]} frames per sample, "
                         f"timesteps={timesteps} asked")
    return frames, labels.astype(np.int64)


def npz_dataset(root: str, split: str = "train", timesteps: int | None = None,
                num_classes: int | None = None) -> FramesDataset:
    """Frames from ``root/{split}.npz`` (``root`` a directory holding ``train.npz`` and
    ``test.npz``) or from ``root`` itself when it is one ``.npz`` file (then every split
    reads it). ``num_classes`` defaults to the largest label + 1 (of both splits' files)."""
    root = os.fspath(root)
    if os.path.isdir(root):
        path, others = os.path.join(root, f"{split}.npz"), [os.path.join(root, f"{s}.npz") for s in ("train", "test")]
    elif os.path.isfile(root):
        path, others = root, [root]
    else:
        raise FileNotFoundError(f"npz data path {root!r} is neither a .npz file nor a directory holding "
                                f"train.npz / test.npz")
    frames, labels = _read_npz(path, timesteps)
    if num_classes is None:
        with_labels = [labels] + [_read_npz(p, None)[1] for p in others if p != path and os.path.isfile(p)]
        num_classes = int(max(int(lab.max()) for lab in with_labels if len(lab))) + 1
    if len(labels) and labels.max() >= num_classes:
        raise ValueError(f"frame file {path!r}: label {int(labels.max())} >= num_classes {num_classes}")
    return FramesDataset(frames, labels, num_classes)


def dvs_dataset(name: str, root: str, split: str = "train", timesteps: int | None = None) -> Dataset:
    """DVS128 Gesture (``name="dvs-gesture"``, 11 classes, its own train/test split) or
    CIFAR10-DVS (``"cifar10-dvs"``, 10 classes, 9:1 per class) through SpikingJelly, as
    ``timesteps`` frames per sample (16 by default). SpikingJelly integrates the events
    into frames on first use and caches them under ``root``."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name} root {root!r} does not exist or is not a directory")
    try:
        from spikingjelly.datasets import cifar10_dvs, dvs128_gesture
    except ImportError as exc:
        raise ImportError(f"{name} is read through SpikingJelly's dataset classes, which need spikingjelly and "
                          f"torchvision ({exc}); or convert the frames to .npz and use --data npz") from exc
    T = timesteps if timesteps is not None else DVS_TIMESTEPS
    frame_args = dict(data_type="frame", frames_number=T, split_by="number")
    if name == "dvs-gesture":
        return _SJFrames(dvs128_gesture.DVS128Gesture(root, train=split == "train", **frame_args), 11, T)
    full = cifar10_dvs.CIFAR10DVS(root, **frame_args)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(full.targets):
        by_class.setdefault(int(label), []).append(i)
    idx = []
    for members in by_class.values():
        cut = int(np.ceil(len(members) * _CIFAR10_DVS_TRAIN_RATIO))
        idx += members[:cut] if split == "train" else members[cut:]
    return _SJFrames(Subset(full, sorted(idx)), 10, T)
