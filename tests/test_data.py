"""The data loaders on small data made here: digits, an ImageFolder tree of PNGs, CIFAR
pickles, .npz frames; the registry; and every bad path / layout / file."""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from cbp_kernels.data import DATASETS, get_dataset, time_major
from cbp_kernels.data import imagefolder as imagefolder_mod


def _png_tree(root, classes=("cat", "dog"), per_class=3, size=(12, 10)):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for name in classes:
            os.makedirs(root / split / name)
            for i in range(per_class):
                pixels = rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def _cifar10_dir(root, n=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.randint(0, 10, n))}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    return base


def test_digits_fixed_split_and_range():
    train, test = get_dataset("digits", split="train"), get_dataset("digits", split="test", timesteps=3)
    assert (len(train), len(test)) == (1438, 359)
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert train.num_classes == 10 and train.static and test.timesteps == 3 and train.timesteps == 4
    assert set(train.labels.tolist()) == set(range(10))
    again = get_dataset("digits", split="train")
    assert torch.equal(again.images, train.images)  # the split is fixed, not drawn per call


def test_time_major_static_and_frames():
    x = torch.randn(5, 2, 3, 3)
    seq = time_major(x, 4)
    assert seq.shape == (4, 5, 2, 3, 3) and all(torch.equal(seq[t], x) for t in range(4))
    frames = torch.randn(5, 4, 2, 3, 3)
    assert torch.equal(time_major(frames, 4)[2], frames[:, 2])
    with pytest.raises(ValueError, match="3 timesteps"):
        time_major(torch.randn(5, 3, 2, 3, 3), 4)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        time_major(torch.randn(5, 3), 4)


@pytest.mark.parametrize("torchvision", [False, True])
def test_imagefolder_png_tree(tmp_path, monkeypatch, torchvision):
    if torchvision:
        pytest.importorskip("torchvision", reason="the torchvision path runs where torchvision is installed")
    else:  # the PIL path, whether or not torchvision is installed
        monkeypatch.setattr(imagefolder_mod, "_torchvision_transform", lambda *a: None)
    root = _png_tree(tmp_path)
    train = get_dataset("imagefolder", str(root), "train", 2, image_size=8)
    test = get_dataset("imagefolder", str(root), "test", image_size=8)
    assert (len(train), len(test), train.num_classes, train.classes) == (6, 6, 2, ["cat", "dog"])
    x, y = test[4]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    # centre crop + normalisation of the test split, recomputed by hand from the file
    from PIL import Image

    # 12x10 image: the shorter side 10 -> round(8 * 256 / 224) = 9, so 10x9, then the centre 8x8
    img = Image.open(root / "val" / "dog" / "1.png").convert("RGB").resize((10, 9), Image.BILINEAR)
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[:, 0:8, 1:9] / 255
    mean, std = torch.tensor(imagefolder_mod.IMAGENET_MEAN), torch.tensor(imagefolder_mod.IMAGENET_STD)
    torch.testing.assert_close(x, (ref - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    assert train[0][0].shape == (3, 8, 8)  # random crop + flip path


def test_imagefolder_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefolder_mod, "_torchvision_transform", lambda *a: None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_dataset("imagefolder", str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subdirectories"):
        get_dataset("imagefolder", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"val'.*test'"):
        get_dataset("imagefolder", str(tmp_path), "test")
    (tmp_path / "train" / "a").mkdir()
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files"):
        get_dataset("imagefolder", str(tmp_path))
    bad = tmp_path / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    ds = get_dataset("imagefolder", str(tmp_path), image_size=8)
    with pytest.raises(OSError, match="broken.png"):
        ds[0]
    with pytest.raises(ValueError, match="image_size"):
        get_dataset("imagefolder", str(tmp_path), image_size=0)


def test_cifar10_pickles(tmp_path):
    base = _cifar10_dir(tmp_path)
    train = get_dataset("cifar10", str(tmp_path), "train")
    test = get_dataset("cifar10", str(base), "test", augment=False)  # the batches directory itself works too
    assert (len(train), len(test), train.num_classes, train.timesteps) == (20, 4, 10, 4)
    with open(base / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    x, y = test[2]
    expect = torch.from_numpy(raw[b"data"][2].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor((0.4914, 0.4822, 0.4465)), torch.tensor((0.2470, 0.2435, 0.2616))
    torch.testing.assert_close(x, (expect - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    assert y == raw[b"labels"][2] and train[0][0].shape == (3, 32, 32)


def test_cifar100_pickles(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        with open(base / name, "wb") as f:
            batch = {b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": [99] * n, b"coarse_labels": [0] * n}
            pickle.dump(batch, f)
    test = get_dataset("cifar100", str(tmp_path), "test")
    assert (len(test), test.num_classes, test[0][1]) == (3, 100, 99)


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        get_dataset("cifar10", str(tmp_path))
    base = _cifar10_dir(tmp_path)
    os.remove(base / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        get_dataset("cifar10", str(tmp_path))
    (base / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="test_batch"):
        get_dataset("cifar10", str(tmp_path), "test")
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match=r"test_batch.*b'labels'"):
        get_dataset("cifar10", str(tmp_path), "test")
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"test_batch.*\[N, 3072\]"):
        get_dataset("cifar10", str(tmp_path), "test")
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(ValueError, match="label 10"):
        get_dataset("cifar10", str(tmp_path), "test")


def test_npz_frames_directory_and_file(tmp_path):
    rng = np.random.RandomState(0)
    frames = (rng.rand(5, 3, 2, 4, 4) > 0.5).astype(np.uint8)
    np.savez(tmp_path / "train.npz", frames=frames, labels=np.array([0, 1, 2, 1, 0]))
    np.savez(tmp_path / "test.npz", frames=frames[:2], labels=np.array([4, 0]))
    train = get_dataset("npz", str(tmp_path), "train")
    assert (len(train), train.timesteps, train.num_classes, train.static) == (5, 3, 5, False)
    x, y = train[1]
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(frames[1]).float()) and y == 1
    one = get_dataset("npz", str(tmp_path / "test.npz"), "train", 3)
    assert (len(one), one.num_classes) == (2, 5)
    batch = torch.stack([train[i][0] for i in range(2)])
    assert time_major(batch, train.timesteps).shape == (3, 2, 2, 4, 4)


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        get_dataset("npz", str(tmp_path / "nothing.npz"))
    with pytest.raises(FileNotFoundError, match="train.npz"):
        get_dataset("npz", str(tmp_path))
    path = tmp_path / "train.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="train.npz"):
        get_dataset("npz", str(tmp_path))
    np.savez(path, images=np.zeros((2, 3, 1, 2, 2)), labels=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"train.npz.*'frames' and 'labels'.*images"):
        get_dataset("npz", str(tmp_path))
    np.savez(path, frames=np.zeros((2, 3, 2, 2)), labels=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"train.npz.*\[N, T, C, H, W\]"):
        get_dataset("npz", str(tmp_path))
    np.savez(path, frames=np.zeros((2, 3, 1, 2, 2)), labels=np.zeros(3, int))
    with pytest.raises(ValueError, match=r"train.npz.*'labels' must be \[N\]"):
        get_dataset("npz", str(tmp_path))
    np.savez(path, frames=np.zeros((2, 3, 1, 2, 2)), labels=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="integers"):
        get_dataset("npz", str(tmp_path))
    np.savez(path, frames=np.zeros((2, 3, 1, 2, 2)), labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="T=3.*timesteps=16"):
        get_dataset("npz", str(tmp_path), timesteps=16)
    with pytest.raises(ValueError, match="num_classes"):
        get_dataset("npz", str(tmp_path), num_classes=1)


class _FakeSJFrames:
    """Stands in for SpikingJelly's frame data sets (which need torchvision): records the
    arguments, yields ([T, 2, 4, 4] uint8 frames, label) like them."""

    calls: list = []

    def __init__(self, root, train=None, data_type="event", frames_number=None, split_by=None):
        type(self).calls.append(dict(root=root, train=train, data_type=data_type, frames_number=frames_number,
                                     split_by=split_by))
        self.targets = [i % 2 for i in range(20)]
        self.T = frames_number

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return np.full((self.T, 2, 4, 4), i, dtype=np.uint8), self.targets[i]


def test_dvs_through_spikingjelly_classes(tmp_path, monkeypatch):
    import types

    fake = types.ModuleType("spikingjelly.datasets")
    fake.dvs128_gesture = types.SimpleNamespace(DVS128Gesture=_FakeSJFrames)
    fake.cifar10_dvs = types.SimpleNamespace(CIFAR10DVS=_FakeSJFrames)
    monkeypatch.setitem(sys.modules, "spikingjelly.datasets", fake)
    _FakeSJFrames.calls = []
    gesture = get_dataset("dvs-gesture", str(tmp_path), "test")
    assert _FakeSJFrames.calls[-1] == dict(root=str(tmp_path), train=False, data_type="frame", frames_number=16,
                                           split_by="number")
    x, y = gesture[3]
    assert x.shape == (16, 2, 4, 4) and x.dtype == torch.float32 and float(x[0, 0, 0, 0]) == 3 and y == 1
    assert (gesture.num_classes, gesture.timesteps, gesture.static) == (11, 16, False)
    train = get_dataset("cifar10-dvs", str(tmp_path), "train", timesteps=8)
    test = get_dataset("cifar10-dvs", str(tmp_path), "test", timesteps=8)
    assert _FakeSJFrames.calls[-1]["frames_number"] == 8 and train.num_classes == 10
    # 10 samples per class: the first 9 of each class train, the last one tests
    assert (len(train), len(test)) == (18, 2) and [int(test[i][0][0, 0, 0, 0]) for i in range(2)] == [18, 19]
    with pytest.raises(FileNotFoundError, match="missing_root"):
        get_dataset("dvs-gesture", str(tmp_path / "missing_root"))


def test_dvs_without_spikingjelly_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spikingjelly.datasets", None)  # as when torchvision is missing
    with pytest.raises(ImportError, match="--data npz"):
        get_dataset("cifar10-dvs", str(tmp_path))


def test_registry_arguments():
    assert {"digits", "imagefolder", "cifar10", "cifar100", "dvs-gesture", "cifar10-dvs", "npz"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        get_dataset("digits", split="validation")
    with pytest.raises(ValueError, match="timesteps"):
        get_dataset("digits", timesteps=0)
    with pytest.raises(ValueError, match="no data path"):
        get_dataset("digits", "/tmp")
    for name in ("imagefolder", "cifar10", "npz", "dvs-gesture"):
        with pytest.raises(ValueError, match="needs a data path"):
            get_dataset(name)


def _sj_frames_tree(root, classes, per_class, T, split=None, shape=(2, 3, 3)):
    """SpikingJelly's integrated-frames layout: root/frames_number_{T}_split_by_number/[split/]
    <class>/<sample>.npz holding ``frames`` [T, C, H, W]; frames of sample k are all k."""
    base = root / f"frames_number_{T}_split_by_number"
    base = base / split if split else base
    k = 0
    for cls in classes:
        (base / cls).mkdir(parents=True)
        for j in range(per_class):
            np.savez(base / cls / f"s{j}.npz", frames=np.full((T, *shape), k, dtype=np.float32))
            k += 1
    (root / "events_np").mkdir(exist_ok=True)  # SpikingJelly's raw root (its classes check it exists)


GESTURE_CLASSES = [str(i) for i in range(11)]
CIFAR10_DVS_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_dvs_reads_spikingjelly_frames_without_spikingjelly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spikingjelly.datasets", None)  # the folder is read directly
    _sj_frames_tree(tmp_path, GESTURE_CLASSES, 2, 4, split="test")
    gesture = get_dataset("dvs-gesture", str(tmp_path), "test", timesteps=4)
    assert (len(gesture), gesture.num_classes, gesture.timesteps, gesture.static) == (22, 11, 4, False)
    # torchvision DatasetFolder order, as SpikingJelly: folders sorted by NAME, so "10" is label 2
    names = sorted(GESTURE_CLASSES)
    for i in range(len(gesture)):
        x, y = gesture[i]
        k = int(x[0, 0, 0, 0])  # the sample's creation index: folder GESTURE_CLASSES[k // 2]
        assert x.shape == (4, 2, 3, 3) and x.dtype == torch.float32 and y == names.index(GESTURE_CLASSES[k // 2])
    with pytest.raises(ImportError, match="no integrated frames.*--data npz"):
        get_dataset("dvs-gesture", str(tmp_path), "train", timesteps=4)  # no train folder: would need SpikingJelly

    cifar_root = tmp_path / "c10dvs"
    _sj_frames_tree(cifar_root, CIFAR10_DVS_CLASSES, 10, 3)
    train = get_dataset("cifar10-dvs", str(cifar_root), "train", timesteps=3)
    test = get_dataset("cifar10-dvs", str(cifar_root), "test", timesteps=3)
    assert (len(train), len(test), train.num_classes, test.timesteps) == (90, 10, 10, 3)
    assert [int(test[i][0][0, 0, 0, 0]) for i in range(10)] == [10 * c + 9 for c in range(10)]
    assert [test[i][1] for i in range(10)] == list(range(10))


def test_dvs_frames_folder_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spikingjelly.datasets", None)
    _sj_frames_tree(tmp_path, GESTURE_CLASSES[:5], 1, 4, split="train")
    with pytest.raises(ValueError, match="11 class folders, found 5"):
        get_dataset("dvs-gesture", str(tmp_path), "train", timesteps=4)
    _sj_frames_tree(tmp_path / "t", GESTURE_CLASSES, 1, 4, split="train")
    gesture = get_dataset("dvs-gesture", str(tmp_path / "t"), "train", timesteps=4)
    bad = tmp_path / "t" / "frames_number_4_split_by_number" / "train" / "3" / "s0.npz"
    np.savez(bad, frames=np.zeros((5, 2, 3, 3), np.float32))
    i = next(i for i, (p, _) in enumerate(gesture.samples) if p == str(bad))
    with pytest.raises(ValueError, match=r"s0\.npz.*T=4"):
        gesture[i]
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot read frame file .*s0\.npz"):
        gesture[i]
    (tmp_path / "t" / "frames_number_4_split_by_number.building").touch()
    with pytest.raises(RuntimeError, match="did not finish"):
        get_dataset("dvs-gesture", str(tmp_path / "t"), "train", timesteps=4)


def _spikingjelly_datasets_import_error():
    try:
        import spikingjelly.datasets.dvs128_gesture  # noqa: F401  (needs torchvision)
    except ImportError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(_spikingjelly_datasets_import_error() is not None,
                    reason="SpikingJelly's dataset classes import where torchvision is installed")
def test_dvs_frames_folder_matches_spikingjelly(tmp_path):
    from spikingjelly.datasets import dvs128_gesture

    _sj_frames_tree(tmp_path, GESTURE_CLASSES, 2, 4, split="test")
    ours = get_dataset("dvs-gesture", str(tmp_path), "test", timesteps=4)
    theirs = dvs128_gesture.DVS128Gesture(str(tmp_path), train=False, data_type="frame", frames_number=4,
                                          split_by="number")
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
        x, y = ours[i]
        fx, fy = theirs[i]
        assert y == fy and torch.equal(x, torch.as_tensor(fx))


def test_sample_frames_sorted_distinct_subset():
    from cbp_kernels.data.dvs import sample_frames

    x = torch.arange(16.0).reshape(1, 16, 1, 1, 1).expand(3, 16, 2, 1, 1)
    seen = set()
    for seed in range(20):
        y = sample_frames(x, 12, torch.Generator().manual_seed(seed))
        idx = y[0, :, 0, 0, 0].tolist()
        assert y.shape == (3, 12, 2, 1, 1) and idx == sorted(set(idx)) and torch.equal(y, x[:, [int(i) for i in idx]])
        seen.add(tuple(idx))
    assert len(seen) > 1  # random draws
    static = torch.randn(3, 2, 4, 4)
    assert sample_frames(static, 2) is static and sample_frames(x, 16) is x


def test_fit_trains_on_timesteps_train_frames(tmp_path):
    import torch.nn as nn

    from cbp_kernels.quant import CBPConfig, CBPQuantizer

    frames = torch.randn(16, 16, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(frames, torch.randint(0, 2, (16,))),
                                         batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    shapes = []

    def forward(m, x):  # x [N, T, 1, 1, 4] -> mean over time
        shapes.append(tuple(x.shape))
        return m(x).mean((1, 2, 3))

    q = CBPQuantizer(model, "binary", config=CBPConfig(timesteps_train=12))
    q.fit([(x.reshape(8, 16, 1, 1, 4), y) for x, y in loader], nn.functional.cross_entropy, epochs=1,
          forward_fn=forward, progress=False)
    assert shapes == [(8, 12, 1, 1, 4)] * 2
