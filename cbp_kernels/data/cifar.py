"""CIFAR-10 / CIFAR-100 in their standard python-pickle form (as downloaded from the
CIFAR page and unpacked): ``cifar-10-batches-py/{data_batch_1..5, test_batch}`` and
``cifar-100-python/{train, test}``; ``root`` is that directory or its parent."""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CIFARDataset", "cifar_dataset", "CIFAR_MEAN", "CIFAR_STD"]

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# num_classes -> (directory name, {split: batch files}, label key)
_LAYOUT = {
    10: ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels"),
    100: ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels"),
}


def _read_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR batch file {path!r} is missing")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # truncated / not a pickle: name the file whatever the unpickler raised
        raise ValueError(f"cannot read CIFAR batch {path!r} (not a python pickle?): {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"CIFAR batch {path!r} must be a dict with keys b'data' and {label_key!r}, got {keys}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"CIFAR batch {path!r}: b'data' must be [N, 3072] with N labels, "
                         f"got data {data.shape} and {len(labels)} labels")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


class CIFARDataset(Dataset):
    """``x``: ``[3, 32, 32]`` float32 normalised with the CIFAR mean/std. ``augment``
    (default: ``split == "train"``): random 32x32 crop of the 4-pixel zero-padded image
    and a random horizontal flip, the usual CIFAR training transform."""

    static = True

    def __init__(self, root: str, split: str = "train", timesteps: int = 4, num_classes: int = 10,
                 augment: bool | None = None):
        if num_classes not in _LAYOUT:
            raise ValueError(f"num_classes must be 10 or 100, got {num_classes!r}")
        dirname, files, label_key = _LAYOUT[num_classes]
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"CIFAR-{num_classes} root {root!r} does not exist or is not a directory")
        base = root if os.path.basename(os.path.normpath(root)) == dirname else os.path.join(root, dirname)
        if not os.path.isdir(base):
            raise FileNotFoundError(f"CIFAR-{num_classes}: {base!r} is missing (give the directory holding "
                                    f"{dirname}/ or {dirname}/ itself)")
        parts = [_read_batch(os.path.join(base, f), label_key) for f in files[split]]
        self.images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        self.labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        bad = (self.labels < 0) | (self.labels >= num_classes)
        if bad.any():
            raise ValueError(f"CIFAR-{num_classes} {base!r}: label {int(self.labels[bad][0])} "
                             f"is outside 0..{num_classes - 1}")
        self.num_classes, self.timesteps = num_classes, timesteps
        self.augment = split == "train" if augment is None else augment
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255.0)
        if self.augment:
            top, left = (int(v) for v in torch.randint(0, 9, (2,)))
            x = torch.nn.functional.pad(x, (4, 4, 4, 4))[:, top:top + 32, left:left + 32]
            if torch.rand(1) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std, int(self.labels[i])


def cifar_dataset(root, split, timesteps, num_classes=10, **options) -> CIFARDataset:
    return CIFARDataset(root, split, timesteps if timesteps is not None else 4, num_classes, **options)
