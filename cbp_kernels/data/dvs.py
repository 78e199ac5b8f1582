"""Event data as frames: DVS128 Gesture and CIFAR10-DVS through SpikingJelly's dataset
classes (``data_type="frame"``, ``split_by="number"``, T=16 by default), or any frame
arrays saved as ``.npz`` (``frames`` ``[N, T, C, H, W]``, ``labels`` ``[N]``)."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

__all__ = ["FramesDataset", "dvs_dataset", "npz_dataset", "sample_frames", "DVS_TIMESTEPS"]

DVS_TIMESTEPS = 16  # the frame count of the paper's DVS runs (Table 4: Steps 16)
# CIFAR10-DVS ships no split: the first 90 % of each class train, as SpikingJelly's split.
_CIFAR10_DVS_TRAIN_RATIO = 0.9


def sample_frames(x: torch.Tensor, timesteps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random subset of ``timesteps`` of a batch's frames, kept in time order: ``x``
    ``[N, T, ...]`` -> ``x[:, idx]`` with ``idx`` = ``timesteps`` distinct sorted frame
    indices drawn from ``generator`` (default torch's global one: seeded per epoch and
    checkpointed by ``QuantTrainer.fit``, so a resumed run draws the same frames). One draw
    per batch, as the SEW-ResNet DVS128 code of the CBP authors (yoees/CBP-QSNN@006ec63,
    CBP-QSNN-SEW-ResNet/DVS128Gesture/main_quantize_cbp.py: ``np.random.choice(T, T_train,
    replace=False)``, sorted). A batch of T <= ``timesteps`` frames, or of another rank
    than 5 (static images), is returned as it is."""
    if x.dim() != 5 or x.shape[1] <= timesteps:
        return x
    idx = torch.randperm(x.shape[1], generator=generator)[:timesteps].sort().values
    return x[:, idx.to(x.device)]


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
    """A SpikingJelly frame data set as ``([T, C, H, W]`` float32, int)."""

    static = False

    def __init__(self, base: Dataset, num_classes: int, timesteps: int):
        self.base, self.num_classes, self.timesteps = base, num_classes, timesteps
        self.targets = base.targets

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


class _FramesFolder(Dataset):
    """A folder of SpikingJelly's integrated frames, read without SpikingJelly: one
    sub-folder per class, one ``.npz`` (array ``frames`` ``[T, C, H, W]``) per sample, in
    torchvision ``DatasetFolder`` order (classes sorted by folder name, label = index in that
    order; files sorted), exactly as SpikingJelly's data set classes list them."""

    static = False

    def __init__(self, split_root: str, num_classes: int, timesteps: int):
        classes = sorted(e.name for e in os.scandir(split_root) if e.is_dir())
        if len(classes) != num_classes:
            raise ValueError(f"frame folder {split_root!r} must hold {num_classes} class folders, "
                             f"found {len(classes)}: {classes}")
        self.samples = [
            (os.path.join(top, name), label)
            for label, cls in enumerate(classes)
            for top, _, names in sorted(os.walk(os.path.join(split_root, cls), followlinks=True))
            for name in sorted(names) if name.lower().endswith(".npz")
        ]
        if not self.samples:
            raise ValueError(f"frame folder {split_root!r} holds no .npz frame files")
        self.targets = [label for _, label in self.samples]
        self.num_classes, self.timesteps = num_classes, timesteps

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with np.load(path, allow_pickle=False) as f:
                frames = f["frames"]
        except Exception as exc:  # not a zip / no 'frames' array: name the file whatever numpy raised
            raise ValueError(f"cannot read frame file {path!r} (expected SpikingJelly's .npz with an array "
                             f"'frames'): {exc}") from exc
        if frames.ndim != 4 or frames.shape[0] != self.timesteps:
            raise ValueError(f"frame file {path!r}: 'frames' must be [T={self.timesteps}, C, H, W], "
                             f"got shape {frames.shape}")
        return torch.from_numpy(frames.astype(np.float32)), label


def _spikingjelly_frames(name: str, root: str, train: bool | None, timesteps: int) -> Dataset:
    """SpikingJelly's own data set class (it integrates the raw events into frames under
    ``root`` on first use; needs torchvision)."""
    try:
        from spikingjelly.datasets import cifar10_dvs, dvs128_gesture
    except ImportError as exc:
        raise ImportError(f"{name}: {root!r} holds no integrated frames yet; building them from the events "
                          f"needs SpikingJelly's dataset classes, which need spikingjelly and torchvision "
                          f"({exc}); or convert the frames to .npz and use --data npz") from exc
    frame_args = dict(data_type="frame", frames_number=timesteps, split_by="number")
    if name == "dvs-gesture":
        return dvs128_gesture.DVS128Gesture(root, train=train, **frame_args)
    return cifar10_dvs.CIFAR10DVS(root, **frame_args)


def dvs_dataset(name: str, root: str, split: str = "train", timesteps: int | None = None) -> Dataset:
    """DVS128 Gesture (``name="dvs-gesture"``, 11 classes, its own train/test split) or
    CIFAR10-DVS (``"cifar10-dvs"``, 10 classes, 9:1 per class) as ``timesteps`` frames per
    sample (16 by default), in SpikingJelly's layout and order. When ``root`` already holds
    SpikingJelly's integrated frames (``root/frames_number_{T}_split_by_number/``) they are
    read directly (no SpikingJelly or torchvision needed); otherwise SpikingJelly integrates
    the events into that folder first."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{name} root {root!r} does not exist or is not a directory")
    T = timesteps if timesteps is not None else DVS_TIMESTEPS
    num_classes = 11 if name == "dvs-gesture" else 10
    frames_root = os.path.join(root, f"frames_number_{T}_split_by_number")
    if os.path.exists(frames_root + ".building"):
        raise RuntimeError(f"{name}: SpikingJelly's frame integration into {frames_root!r} did not finish "
                           f"(marker {frames_root + '.building'!r}); remove both and run again")
    split_root = os.path.join(frames_root, split) if name == "dvs-gesture" else frames_root
    if os.path.isdir(split_root):
        full = _FramesFolder(split_root, num_classes, T)
    else:
        full = _SJFrames(_spikingjelly_frames(name, root, split == "train" if name == "dvs-gesture" else None, T),
                         num_classes, T)
    if name == "dvs-gesture":
        return full
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(full.targets):
        by_class.setdefault(int(label), []).append(i)
    idx = []
    for members in by_class.values():
        cut = int(np.ceil(len(members) * _CIFAR10_DVS_TRAIN_RATIO))
        idx += members[:cut] if split == "train" else members[cut:]
    return _Split(full, sorted(idx))


class _Split(Subset):
    """Some samples of a frame data set (CIFAR10-DVS's 9:1 split), keeping its attributes."""

    static = False

    def __init__(self, full: Dataset, indices: list[int]):
        super().__init__(full, indices)
        self.num_classes, self.timesteps = full.num_classes, full.timesteps
