"""Any ImageFolder tree (ImageNet's layout): ``root/<split dir>/<class name>/<image file>``.

The transforms are torchvision's ImageNet ones when torchvision imports, else the same
steps done with PIL and torch: resize the shorter side to ``round(image_size * 256 / 224)``,
crop ``image_size`` (random + horizontal flip when augmenting, centred otherwise), scale to
[0, 1], normalise with the ImageNet mean and std.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ImageFolderDataset", "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The directory names looked for under root, per split (ImageNet calls its test split "val").
_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}


def _split_dir(root: str, split: str) -> str:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ImageFolder root {root!r} does not exist or is not a directory")
    tried = [os.path.join(root, d) for d in _SPLIT_DIRS[split]]
    for path in tried:
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"ImageFolder split {split!r}: none of {tried} is a directory "
                            f"(expected layout root/<split>/<class>/<image>)")


def _scan(split_root: str) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(e.name for e in os.scandir(split_root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"ImageFolder {split_root!r} has no class subdirectories "
                                f"(expected {split_root}/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_root, name)
        for dirpath, _, files in sorted(os.walk(class_dir, followlinks=True)):
            images = [f for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
            samples += [(os.path.join(dirpath, f), label) for f in images]
    if not samples:
        raise FileNotFoundError(f"ImageFolder {split_root!r} has no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                                f"in its class directories {classes}")
    return classes, samples


def _torchvision_transform(image_size: int, resize: int, augment: bool):
    try:
        from torchvision import transforms as T
    except ImportError:
        return None
    crop = [T.RandomCrop(image_size), T.RandomHorizontalFlip()] if augment else [T.CenterCrop(image_size)]
    return T.Compose([T.Resize(resize), *crop, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _PILTransform:
    """torchvision's Resize(resize) -> RandomCrop+flip | CenterCrop -> ToTensor -> Normalize, with PIL."""

    def __init__(self, image_size: int, resize: int, augment: bool):
        self.image_size, self.resize, self.augment = image_size, resize, augment
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, img):
        from PIL import Image

        w, h = img.size
        short, size = min(w, h), self.image_size
        if w == short:
            new_w, new_h = self.resize, int(self.resize * h / w)
        else:
            new_w, new_h = int(self.resize * w / h), self.resize
        img = img.resize((new_w, new_h), Image.BILINEAR)
        if new_w < size or new_h < size:
            raise ValueError(f"image_size {size} exceeds the resized image {new_w}x{new_h}")
        if self.augment:
            top = int(torch.randint(0, new_h - size + 1, (1,)))
            left = int(torch.randint(0, new_w - size + 1, (1,)))
        else:
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        if self.augment and torch.rand(1) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std


class ImageFolderDataset(Dataset):
    """Images of ``root/{train | val or test}/<class>/*`` as ``[3, image_size, image_size]``
    float32, normalised with the ImageNet mean/std; classes are the sorted subdirectory names.

    ``augment`` (default: ``split == "train"``) takes a random crop and flip instead of the
    centre crop. An unreadable image raises an error naming its file when it is loaded.
    """

    static = True

    def __init__(self, root: str, split: str = "train", timesteps: int = 4, image_size: int = 224,
                 augment: bool | None = None):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.root = _split_dir(os.fspath(root), split)
        self.classes, self.samples = _scan(self.root)
        self.num_classes, self.timesteps = len(self.classes), timesteps
        augment = split == "train" if augment is None else augment
        resize = int(round(image_size * 256 / 224))
        self.transform = (_torchvision_transform(image_size, resize, augment)
                          or _PILTransform(image_size, resize, augment))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as exc:  # PIL raises several types for a bad file: name the file whatever it was
            raise OSError(f"cannot read image {path!r}: {exc}") from exc
        return self.transform(img), label
