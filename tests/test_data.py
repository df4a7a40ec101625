"""Datasets: the embedded digits, a fake CIFAR folder and a tiny class-folder tree."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from attnconv.training.config import DataConfig
from attnconv.training.data import DataError, build_datasets


def test_digits_split_is_fixed_and_stratified() -> None:
    a = build_datasets(DataConfig(augment=False))
    b = build_datasets(DataConfig(augment=False))
    assert (len(a.train), len(a.val)) == (1437, 360)  # 1,797 digits, 20% held out
    assert (a.num_classes, a.in_chans, a.image_size) == (10, 1, 8)
    val_labels = torch.stack([a.val[i][1] for i in range(len(a.val))])
    assert torch.equal(val_labels, torch.stack([b.val[i][1] for i in range(len(b.val))]))
    assert torch.bincount(val_labels).min() >= 35  # about 36 per class
    x, _ = a.train[0]
    assert x.shape == (1, 8, 8)
    images = torch.stack([a.train[i][0] for i in range(len(a.train))])
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-3


def test_digits_resize_and_augmentation_shapes() -> None:
    sets = build_datasets(DataConfig(image_size=16, augment=True))
    x, y = sets.train[3]
    assert x.shape == (1, 16, 16) and 0 <= int(y) < 10


def _fake_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, n: int = 20) -> None:
    """cifar-10-batches-py with one small batch per file; torchvision's md5s are patched to
    those of these files (the real ones belong to the real archive)."""
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5 = {}
    names = [name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    for name in [*names, "batches.meta"]:
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(datasets.CIFAR10, "train_list",
                        [[nm, md5[nm]] for nm, _ in datasets.CIFAR10.train_list])
    monkeypatch.setattr(datasets.CIFAR10, "test_list",
                        [[nm, md5[nm]] for nm, _ in datasets.CIFAR10.test_list])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta,
                                                   "md5": md5["batches.meta"]})


def test_fake_cifar10_folder_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cifar(tmp_path, monkeypatch)
    sets = build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    assert (len(sets.train), len(sets.val)) == (100, 20)  # 5 train batches of 20, 1 test
    assert (sets.num_classes, sets.in_chans, sets.image_size) == (10, 3, 32)
    x, y = sets.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10


def test_cifar_without_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no readable cifar10 in .*--data.download true"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)))


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root is required for data.name=cifar100"):
        build_datasets(DataConfig(name="cifar100"))
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "nowhere")))


def _tree(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog")) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_tree(tmp_path: Path) -> None:
    _tree(tmp_path)
    sets = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    assert (len(sets.train), len(sets.val), sets.num_classes) == (6, 6, 2)
    x, y = sets.val[5]
    assert x.shape == (3, 16, 16) and y == 1


def test_class_folders_without_images_are_a_clear_error(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"no images in .*train"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_without_val_split(tmp_path: Path) -> None:
    _tree(tmp_path)
    for f in (tmp_path / "val").rglob("*.png"):
        f.unlink()
    with pytest.raises(DataError, match=r"no images in .*val"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))
