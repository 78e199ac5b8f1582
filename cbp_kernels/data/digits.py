"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits (no download)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DigitsDataset"]

# 1797 images; a fixed shuffle (seed 0) puts the first 80 % in "train", the rest in "test".
_SPLIT_SEED, _TRAIN_FRACTION = 0, 0.8


class DigitsDataset(Dataset):
    """scikit-learn's ``load_digits``: ``x`` is ``[1, 8, 8]`` float32 in [0, 1] (pixel / 16),
    ``label`` in 0..9. ``split``: ``"train"`` (1437 images) or ``"test"`` (360), a fixed split."""

    num_classes = 10
    static = True

    def __init__(self, split: str = "train", timesteps: int = 4):
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.RandomState(_SPLIT_SEED).permutation(len(digits.target))
        cut = int(round(_TRAIN_FRACTION * len(order)))
        idx = order[:cut] if split == "train" else order[cut:]
        self.images = torch.from_numpy(digits.images[idx] / 16.0).float().unsqueeze(1)
        self.labels = torch.from_numpy(digits.target[idx]).long()
        self.timesteps = timesteps

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
