"""Datasets: the embedded digits, a fake CIFAR folder, tiny class-folder trees, the MNIST family
from local IDX files, the crop policy each data set gets, the last partial training batch and
unreadable images."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from attnconv.classification.config import ClassificationConfig, DataConfig
from attnconv.classification.data import (
    IMAGENET_MEAN,
    ClassificationData,
    build_datasets,
    crop_policy,
)
from attnconv.engine.config import ConfigError, apply
from attnconv.engine.images import check_images, image_files
from attnconv.errors import DataError


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


def _tree(root: Path, per_class: int = 3, classes: tuple[str, ...] = ("cat", "dog"),
          size: tuple[int, int] = (24, 20)) -> list[Path]:
    """Random PNGs in ``{train,val}/{class}/{i}.png``; returns their paths in that order."""
    rng = np.random.default_rng(0)
    files = []
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
                files.append(folder / f"{i}.png")
                Image.fromarray(pixels).save(files[-1])
    return files


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


# --- crop policy, channels, normalisation ----------------------------------------------------

def _gray_tree(root: Path, per_class: int = 4, size: tuple[int, int] = (24, 20)) -> list[Path]:
    """Class folders of grayscale PNGs (width x height ``size``); the files, train then val."""
    rng = np.random.default_rng(1)
    files = []
    for split in ("train", "val"):
        for label, name in enumerate(("coat", "shirt")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 120, size[::-1]) + 100 * label
                Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / f"{i}.png")
                files.append(folder / f"{i}.png")
    return files


def _kinds(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


@pytest.mark.parametrize(("crop", "train_kinds", "val_kinds"), [
    ("imagenet", ["RandomResizedCrop", "RandomHorizontalFlip"], ["Resize", "CenterCrop"]),
    ("cifar", ["Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip"],
     ["Resize", "CenterCrop"]),
    ("none", ["Resize", "CenterCrop", "RandomHorizontalFlip"], ["Resize", "CenterCrop"]),
    ("auto", ["Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip"],  # small: cifar
     ["Resize", "CenterCrop"]),
])
def test_crop_option_sets_the_transforms(tmp_path: Path, crop: str, train_kinds: list[str],
                                         val_kinds: list[str]) -> None:
    _tree(tmp_path)
    sets = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16,
                                     crop=crop))
    tail = ["ToImage", "ToDtype", "Normalize"]
    assert _kinds(sets.train.transform) == train_kinds + tail
    assert _kinds(sets.val.transform) == val_kinds + tail
    resize = sets.val.transform.transforms[0]
    # Only the ImageNet policy validates on the centre of a larger image.
    assert resize.size == ([18] if crop == "imagenet" else [16])
    if crop in ("cifar", "auto"):
        assert sets.train.transform.transforms[2].padding == [2, 2, 2, 2]  # 1/8 of 16 px


def test_auto_crop_is_imagenets_for_large_images(tmp_path: Path) -> None:
    _tree(tmp_path, per_class=1, size=(80, 72))
    sets = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=72))
    assert "RandomResizedCrop" in _kinds(sets.train.transform)
    assert sets.val.transform.transforms[0].size == [82]  # 72 / 0.875
    assert crop_policy("auto", 500, 32) == crop_policy("auto", 28, 224) == "cifar"


def test_crop_option_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"data.crop must be one of auto, imagenet, cifar, "
                                          r"none, not 'centre'"):
        apply(ClassificationConfig(), {"data": {"crop": "centre"}})
    with pytest.raises(ConfigError, match=r"data.channels must be one of None, 1, 3, not 2"):
        apply(ClassificationConfig(), {"data": {"channels": 2}})
    with pytest.raises(DataError, match=r"data.crop and data.channels do not apply to "
                                        r"data.name=digits"):
        build_datasets(DataConfig(crop="imagenet"))


def test_validation_sees_the_training_geometry_without_augmentation(tmp_path: Path) -> None:
    # Before, validation always resized to size / 0.875 and kept the centre: a model trained
    # on whole 28 px images was scored on zoomed-in ones.
    files = _gray_tree(tmp_path)
    sets = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16,
                                     augment=False))
    for i, (path, _) in enumerate(sets.val.samples):
        image = sets.val.loader(path)
        assert torch.equal(sets.val[i][0], sets.train.transform(image))
    assert len(sets.val) == len(files) // 2
    imagenet = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16,
                                         augment=False, crop="imagenet"))
    image = imagenet.val.loader(imagenet.val.samples[0][0])
    assert not torch.equal(imagenet.val[0][0], imagenet.train.transform(image))  # asked for


def test_checkpoint_scores_the_same_on_its_training_geometry(tmp_path: Path) -> None:
    """evaluate() of a checkpoint trained without augmentation gives the loss of the model on
    the validation images transformed as its training images were."""
    from torch.nn import functional as F

    from attnconv.classification.loading import load_trained
    from attnconv.classification.run import evaluate, train

    _gray_tree(tmp_path / "data", per_class=6)
    cfg = apply(ClassificationConfig(), {
        "model": "resnet18", "model_args": {"cifar_stem": True, "channels": [4, 4, 8, 8]},
        "out_dir": str(tmp_path / "runs"), "name": "geometry",
        "data": {"name": "imagefolder", "root": str(tmp_path / "data"), "image_size": 16,
                 "augment": False, "batch_size": 4},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "progress_bar": False}})
    result = train(cfg)
    scored = evaluate(result.best_checkpoint, accelerator="cpu")
    model = load_trained(result.best_checkpoint).model.eval()
    sets = build_datasets(cfg.data)
    images = torch.stack([sets.train.transform(sets.val.loader(p)) for p, _ in sets.val.samples])
    labels = torch.tensor(sets.val.targets)
    assert images.shape[1] == 1  # grayscale stays one channel
    with torch.no_grad():
        loss = F.cross_entropy(model(images), labels).item()
    assert scored["loss"] == pytest.approx(loss, rel=1e-5)


def test_grayscale_folder_stays_one_channel_with_its_own_statistics(tmp_path: Path) -> None:
    _gray_tree(tmp_path)
    sets = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), augment=False,
                                     image_size=20))
    assert sets.in_chans == 1
    train = torch.stack([sets.train[i][0] for i in range(len(sets.train))])
    assert train.shape[1:] == (1, 20, 20)
    # Normalised with the training images' own mean and std, not ImageNet's.
    assert abs(train.mean().item()) < 0.15 and abs(train.std().item() - 1) < 0.15
    rgb = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=20,
                                    channels=3))
    assert rgb.in_chans == 3 and rgb.val[0][0].shape == (3, 20, 20)
    assert torch.equal(rgb.val[0][0][0], rgb.val[0][0][2])
    _tree(tmp_path / "colour")
    colour = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "colour")))
    assert colour.in_chans == 3 and colour.val.transform.transforms[-1].mean == \
        list(IMAGENET_MEAN)


# --- MNIST family --------------------------------------------------------------------------

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, compressed: bool, train: int = 12, test: int = 6) -> None:
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("t10k", test)):
        for kind, array in (("images", rng.integers(0, 256, (n, 28, 28))),
                            ("labels", np.arange(n) % 10)):
            data = _idx_bytes(array)
            name = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
            if compressed:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)


@pytest.mark.parametrize(("name", "layout"), [("mnist", "torchvision"),
                                              ("kmnist", "torchvision"),
                                              ("fashion_mnist", "files.gz"),
                                              ("mnist", "files")])
def test_mnist_family_reads_a_local_copy(tmp_path: Path, name: str, layout: str) -> None:
    cls = {"mnist": datasets.MNIST, "kmnist": datasets.KMNIST,
           "fashion_mnist": datasets.FashionMNIST}[name]
    folder = tmp_path / cls.__name__ / "raw" if layout == "torchvision" else tmp_path
    _write_idx(folder, compressed=layout.endswith(".gz"))
    sets = build_datasets(DataConfig(name=name, root=str(tmp_path), augment=False))
    assert isinstance(sets.train, cls)
    assert (len(sets.train), len(sets.val), sets.num_classes, sets.in_chans, sets.image_size) \
        == (12, 6, 10, 1, 28)
    x, y = sets.val[3]
    assert x.shape == (1, 28, 28) and y == 3
    if layout == "torchvision":  # torchvision reads its own layout the same
        theirs = cls(str(tmp_path), train=False)
        assert torch.equal(sets.val.data, theirs.data)
    flip = "RandomHorizontalFlip" in _kinds(build_datasets(
        DataConfig(name=name, root=str(tmp_path))).train.transform)
    assert flip == (name == "fashion_mnist")  # a flipped digit is another symbol


def test_mnist_family_without_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no kmnist in .*: expected the four IDX files .*"
                                        r"KMNIST/raw; pass --data.download true") as err:
        build_datasets(DataConfig(name="kmnist", root=str(tmp_path)))
    assert "\n" not in str(err.value)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not idx")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(_idx_bytes(np.zeros(3)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is not an IDX file"):
        build_datasets(DataConfig(name="mnist", root=str(tmp_path)))


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {FASHION} "
                           "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_debians_folder() -> None:
    sets = build_datasets(DataConfig(name="fashion_mnist", root=str(FASHION), augment=False))
    assert (len(sets.train), len(sets.val), sets.num_classes, sets.in_chans) == \
        (60000, 10000, 10, 1)
    assert sets.train.classes[9] == "Ankle boot"
    assert int(sets.train.targets[0]) == 9 and int(sets.val.targets[0]) == 9
    assert torch.bincount(sets.val.targets).tolist() == [1000] * 10
    # The published statistics fit the real images: normalised, about mean 0 and std 1.
    images = sets.train.data[:5000].float() / 255
    normalised = (images - 0.2860) / 0.3530
    assert abs(normalised.mean().item()) < 0.02 and abs(normalised.std().item() - 1) < 0.02
    x, _ = sets.val[0]
    assert torch.allclose(x[0], (sets.val.data[0].float() / 255 - 0.2860) / 0.3530, atol=1e-6)


# ---- the last partial training batch -----------------------------------------------------

def test_digits_at_batch_4_drop_the_single_last_sample() -> None:
    cfg = DataConfig(batch_size=4, augment=False)
    data = ClassificationData(cfg)
    data.setup("fit")
    assert len(data.sets.train) == 1437  # 359 x 4 + 1
    train = list(data.train_dataloader())
    assert len(train) == 359 and {x.shape[0] for x, _ in train} == {4}
    val = list(data.val_dataloader())
    assert sum(x.shape[0] for x, _ in val) == 360  # validation keeps every sample
    # Why: BatchNorm in training mode cannot normalise a batch of one 1x1 feature map.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm1d(4).train()(torch.randn(1, 4))


def test_a_batch_larger_than_the_training_set_is_a_clear_error() -> None:
    data = ClassificationData(DataConfig(batch_size=2000))
    data.setup("fit")
    with pytest.raises(DataError, match=r"data.batch_size 2000 is larger than the training set "
                                        r"\(1437 samples"):
        data.train_dataloader()


# ---- unreadable images ---------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])



def test_a_truncated_image_names_its_file_when_read(tmp_path: Path) -> None:
    files = _tree(tmp_path, per_class=2)
    _truncate(files[1])
    sets = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    sets.train[0]  # a good one reads
    with pytest.raises(DataError, match=rf"cannot read image {files[1]}: .*truncated"):
        sets.train[1]


def test_data_check_opens_every_image_before_training(tmp_path: Path) -> None:
    files = _tree(tmp_path, per_class=2)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16)
    sets = build_datasets(cfg)
    assert sorted(image_files(sets.train) + image_files(sets.val)) == sorted(files)
    assert check_images(files, progress=False) == 8
    _truncate(files[1])
    (files[6]).write_text("not a png")
    cfg.check = True
    with pytest.raises(DataError, match=r"^2 of 8 images cannot be read: ") as err:
        build_datasets(cfg)
    assert str(files[1]) in str(err.value) and str(files[6]) in str(err.value)
    assert "\n" not in str(err.value)


def test_data_check_is_a_config_option() -> None:
    assert apply(ClassificationConfig(), {"data": {"check": True}}, where="test").data.check is True
    assert DataConfig().check is False
