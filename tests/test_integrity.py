"""Data and file integrity: weight digests, writes killed mid-way, file modes, the last partial
batch, unreadable images and COCO annotation validation."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnconv.classification.config import DataConfig
from attnconv.classification.data import (
    ClassificationData,
    DataError,
    build_datasets,
    check_images,
    image_files,
)
from attnconv.engine.checkpoint import SafeCheckpointIO
from attnconv.weights import (
    DIGEST_KEY,
    CorruptCheckpointError,
    atomic_save,
    content_digest,
    read_state_dict,
    remove_stale_temporaries,
    safe_load,
    tensor_digest,
)

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"state_dict": {"conv.weight": torch.randn(16, 8, 3, 3, generator=g),
                           "bn.num_batches_tracked": torch.tensor(7)},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.randn(50, generator=g)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "epoch": 3}


def _flip_inside(path: Path, tensor: torch.Tensor, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``tensor``'s stored bytes (found in the file)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    start = data.find(raw)
    assert start >= 0 and data.find(raw, start + 1) < 0
    middle = start + len(raw) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- item 9: a digest of the tensors in every checkpoint --------------------------------------

def test_digest_is_stored_verified_and_removed(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    atomic_save(ckpt, tmp_path / "a.ckpt")
    assert DIGEST_KEY not in ckpt  # the caller's dict is not changed
    raw = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert raw[DIGEST_KEY] == {"content_sha256": content_digest(ckpt)}
    loaded = safe_load(tmp_path / "a.ckpt")
    assert DIGEST_KEY not in loaded and loaded.keys() == ckpt.keys()
    torch.testing.assert_close(loaded["state_dict"], ckpt["state_dict"])
    assert read_state_dict(raw).keys() == {"conv.weight", "bn.num_batches_tracked"}


def test_digest_sees_every_tensor_byte_and_name() -> None:
    ckpt = _checkpoint()
    base = tensor_digest(ckpt)
    assert tensor_digest(_checkpoint()) == base
    changed = _checkpoint()
    changed["optimizer_states"][0]["state"][0]["momentum_buffer"][17] += 1e-7
    assert tensor_digest(changed) != base
    renamed = _checkpoint()
    renamed["state_dict"]["conv.bias"] = renamed["state_dict"].pop("conv.weight")
    assert tensor_digest(renamed) != base
    reshaped = _checkpoint()
    reshaped["state_dict"]["conv.weight"] = reshaped["state_dict"]["conv.weight"].view(16, 72)
    assert tensor_digest(reshaped) != base
    bf16 = {"w": torch.randn(4, 4).to(torch.bfloat16), "s": torch.tensor(1.5)}
    assert tensor_digest(bf16) != tensor_digest({"w": bf16["w"].float(), "s": bf16["s"]})


def test_flipped_bytes_in_a_weight_are_an_error_naming_the_file(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    path = tmp_path / "best.ckpt"
    atomic_save(ckpt, path)
    _flip_inside(path, ckpt["state_dict"]["conv.weight"])
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is corrupt: its contents do not"):
        safe_load(path)
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        SafeCheckpointIO().load_checkpoint(path)


def test_one_changed_byte_of_metadata_is_an_error(tmp_path: Path) -> None:
    # What `attnconv eval` rebuilds the data from: image_size 16 -> 8 evaluated silently.
    ckpt = {**_checkpoint(), "attnconv": {"config": {"data": {"image_size": 16}},
                                          "num_classes": 10}}
    path = tmp_path / "best.ckpt"
    atomic_save(ckpt, path)
    data = path.read_bytes()
    found = re.search(rb"image_size(?:q.|r....)?K\x10", data, re.DOTALL)
    assert found and len(re.findall(rb"image_size", data)) == 1
    end = found.end() - 1
    path.write_bytes(data[:end] + b"\x08" + data[end + 1:])
    assert torch.load(path, weights_only=True)["attnconv"]["config"]["data"]["image_size"] == 8
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is corrupt"):
        safe_load(path)


@pytest.mark.parametrize("change", ["value", "key", "added", "type"])
def test_the_digest_covers_every_key_and_value(change: str) -> None:
    ckpt = {**_checkpoint(), "attnconv": {"config": {"seed": 0, "name": "a"}, "classes": [1, 2]}}
    changed = {**ckpt, "attnconv": {"config": {"seed": 0, "name": "a"}, "classes": [1, 2]}}
    meta = changed["attnconv"]
    if change == "value":
        meta["config"]["name"] = "b"
    elif change == "key":
        meta["config"] = {"seed": 0, "nam": "a"}
    elif change == "added":
        meta["classes"].append(3)
    else:
        meta["config"]["seed"] = 0.0
    assert content_digest(ckpt) == content_digest(_copy_of(ckpt))
    assert content_digest(changed) != content_digest(ckpt)


def _copy_of(ckpt: dict) -> dict:
    return {**ckpt, "attnconv": {"config": dict(ckpt["attnconv"]["config"]),
                                 "classes": list(ckpt["attnconv"]["classes"])}}


def test_a_digest_of_the_tensors_alone_is_still_checked(tmp_path: Path) -> None:
    # Files of earlier versions carry {"sha256": digest of the tensors}.
    ckpt = _checkpoint()
    torch.save({**ckpt, DIGEST_KEY: {"sha256": tensor_digest(ckpt)}}, tmp_path / "old.ckpt")
    assert safe_load(tmp_path / "old.ckpt").keys() == ckpt.keys()
    _flip_inside(tmp_path / "old.ckpt", ckpt["state_dict"]["conv.weight"])
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        safe_load(tmp_path / "old.ckpt")


def test_a_state_dict_keeps_its_type_and_metadata(tmp_path: Path) -> None:
    state = torch.nn.BatchNorm2d(3).state_dict()
    atomic_save(state, tmp_path / "bn.pth")
    loaded = safe_load(tmp_path / "bn.pth")
    assert type(loaded) is type(state) and loaded._metadata == state._metadata
    assert list(loaded) == list(state)
    torch.nn.BatchNorm2d(3).load_state_dict(loaded)


def test_checkpoints_without_a_digest_still_load(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    torch.save(ckpt, tmp_path / "old.ckpt")
    _flip_inside(tmp_path / "old.ckpt", ckpt["state_dict"]["conv.weight"])  # undetectable
    assert safe_load(tmp_path / "old.ckpt").keys() == ckpt.keys()
    torch.save(ckpt["state_dict"], tmp_path / "plain.pth")
    assert read_state_dict(tmp_path / "plain.pth").keys() == ckpt["state_dict"].keys()


def test_lightning_checkpoint_io_writes_the_digest(tmp_path: Path) -> None:
    io = SafeCheckpointIO()
    io.save_checkpoint(_checkpoint(), tmp_path / "last.ckpt")
    assert DIGEST_KEY in torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert DIGEST_KEY not in io.load_checkpoint(tmp_path / "last.ckpt")


# ---- item 10: writes killed mid-way, and the file mode ----------------------------------------

_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    import torch
    from attnconv.weights import atomic_save

    def stuck_save(obj, f):  # writes part of a file, then waits to be killed
        f.write(b"x" * 65536)
        f.flush()
        open(sys.argv[2], "w").close()
        time.sleep(120)

    torch.save = stuck_save
    atomic_save({"w": torch.zeros(3)}, sys.argv[1])
""")


def _kill_mid_write(target: Path) -> None:
    """Start a process writing ``target`` and SIGKILL it, by PID, in the middle of the write."""
    marker = target.parent / f"writing-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target), str(marker),
                             str(ROOT)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()  # reaped: its PID no longer names a process
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # starts a Python that imports torch
def test_a_kill_mid_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path: Path
                                                                          ) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(3)}, target)
    _kill_mid_write(target)
    (leftover,) = tmp_path.glob(".last.ckpt.*.tmp")
    assert leftover.stat().st_size >= 65536
    torch.testing.assert_close(safe_load(target)["w"], torch.ones(3))  # the old file, whole
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # exited and reaped
    earlier = tmp_path / f".last.ckpt.{int(dead.stdout)}.0123abcd.tmp"
    earlier.write_bytes(b"x" * 100)
    other = tmp_path / f".best.ckpt.{int(dead.stdout)}.abcd1234.tmp"  # another target's
    other.write_bytes(b"x")
    atomic_save({"w": torch.full((3,), 2.0)}, target)
    assert sorted(tmp_path.glob(".last.ckpt.*.tmp")) == [] and other.exists()
    torch.testing.assert_close(safe_load(target)["w"], torch.full((3,), 2.0))


def test_a_live_writers_temporary_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".last.ckpt.{sleeper.pid}.0123abcd.tmp"
        live.write_bytes(b"in progress")
        legacy = tmp_path / ".last.ckpt.k2_j9x1q.tmp"  # tempfile.mkstemp's name, no PID
        legacy.write_bytes(b"old")
        assert remove_stale_temporaries(target) == [legacy]
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(target) == [live]


def test_checkpoints_get_the_umask_default_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_save({"w": torch.zeros(1)}, tmp_path / "a.ckpt")
        SafeCheckpointIO().save_checkpoint({"w": torch.zeros(1)}, tmp_path / "b.ckpt")
    finally:
        os.umask(old)
    for name in ("a.ckpt", "b.ckpt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640  # 0o666 & ~0o027


# ---- item 4: the last partial training batch -------------------------------------------------

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


# ---- item 8: unreadable images ---------------------------------------------------------------

def _tree(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                files.append(root / split / name / f"{i}.png")
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(files[-1])
    return files


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def test_a_truncated_image_names_its_file_when_read(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    _truncate(files[1])
    sets = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    sets.train[0]  # a good one reads
    with pytest.raises(DataError, match=rf"cannot read image {files[1]}: .*truncated"):
        sets.train[1]


def test_data_check_opens_every_image_before_training(tmp_path: Path) -> None:
    files = _tree(tmp_path)
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
    from attnconv.classification.config import ClassificationConfig
    from attnconv.engine.config import apply

    assert apply(ClassificationConfig(), {"data": {"check": True}}, where="test").data.check is True
    assert DataConfig().check is False


# ---- item 7: COCO annotation validation -----------------------------------------------------

def _coco(root: Path, boxes: list[list[float]], category_ids: list[int] | None = None,
          categories: list[int] = (1, 2), size: tuple[int, int] = (40, 30)) -> Path:
    """Two images of ``size`` (W, H); box i on image 1 + i % 2."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in (1, 2):
        Image.new("RGB", size, (i * 50, 0, 0)).save(root / "images" / f"{i}.png")
    ids = category_ids or [1] * len(boxes)
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]}
                       for i in (1, 2)],
            "annotations": [{"id": n + 1, "image_id": 1 + n % 2, "category_id": c, "bbox": b,
                             "area": 10.0, "iscrowd": 0}
                            for n, (b, c) in enumerate(zip(boxes, ids, strict=True))],
            "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    path = root / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_boxes_across_the_border_are_clamped_and_degenerate_ones_dropped_with_one_warning(
        tmp_path: Path) -> None:
    from attnconv.detection.data import AnnotationWarning, coco_dataset

    boxes = [[-0.01, 2, 10, 10],            # crosses the left border by 0.01 px: clamped
             [35, 20, 10, 20],              # crosses right and bottom: clamped to 35..40, 20..30
             [5, 5, 10, 10],                # fine
             [50, 5, 10, 10],               # fully outside
             [3, 3, 0, 5],                  # zero width
             [3, 3, -4, 5],                 # negative width
             [float("nan"), 1, 2, 2],       # not finite (json writes NaN)
             [39.5, 3, 10, 5]]              # 0.5 px wide once clamped
    path = _coco(tmp_path, boxes)
    with pytest.warns(AnnotationWarning) as record:
        dataset = coco_dataset(tmp_path / "images", path, train=False)
    assert len(record) == 1
    assert str(record[0].message) == (
        f"{path}: clamped 2 of 8 boxes to their image, dropped 5 (1 outside the image, "
        "2 zero or negative size, 1 not finite or not 4 numbers, 1 under 1 px after clamping)")
    _, first = dataset[0]
    _, second = dataset[1]
    torch.testing.assert_close(first["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[0.0, 2, 9.99, 12], [5, 5, 15, 15]]))
    torch.testing.assert_close(second["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[35.0, 20, 40, 30]]))
    gt = dataset.coco.loadAnns(dataset.coco.getAnnIds())
    assert [a["bbox"] for a in gt] == [[0.0, 2.0, 9.99, 10.0], [35.0, 20.0, 5.0, 10.0],
                                       [5, 5, 10, 10]]


def test_clean_annotations_give_no_warning(tmp_path: Path) -> None:
    import warnings

    from attnconv.detection.data import coco_dataset

    path = _coco(tmp_path, [[0, 0, 40, 30], [1, 1, 5, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(coco_dataset(tmp_path / "images", path, train=True)) == 2


@pytest.mark.parametrize("case, message", [
    ("unknown category", r"1 annotations of .*ann.json use category ids \[99\] that are not "
                         r"among its categories \[1, 2\]"),
    ("no categories", r"ann.json has no categories"),
    ("missing image", r"1 of 2 images of .*ann.json are missing from .*images, "
                      r"e.g. .*images/2.png"),
    ("no annotations", r"ann.json holds no usable box \(0 annotations\): nothing to train on, "
                       r"and COCO metrics cannot be computed"),
    ("all dropped", r"holds no usable box \(1 annotations, all dropped: 1 outside the image\)"),
])
def test_annotation_files_that_cannot_be_right_stop_with_one_line(tmp_path: Path, case: str,
                                                                  message: str) -> None:
    from attnconv.detection.data import AnnotationError, coco_dataset

    boxes = {"all dropped": [[100, 100, 5, 5]], "no annotations": []}.get(case, [[1, 1, 5, 5]])
    path = _coco(tmp_path, boxes, category_ids=[99] if case == "unknown category" else None,
                 categories=[] if case == "no categories" else [1, 2])
    if case == "missing image":
        (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(AnnotationError, match=message) as err:
        coco_dataset(tmp_path / "images", path, train=False)
    assert "\n" not in str(err.value)


def test_detection_images_are_named_when_unreadable(tmp_path: Path) -> None:
    from attnconv.detection.data import coco_dataset

    path = _coco(tmp_path, [[1, 1, 5, 5], [2, 2, 5, 5]])
    (tmp_path / "images" / "2.png").write_bytes(b"\x89PNG broken")
    dataset = coco_dataset(tmp_path / "images", path, train=False)
    with pytest.raises(DataError, match=r"cannot read image .*images/2.png"):
        dataset[1]
    with pytest.raises(DataError, match=r"^1 of 2 images cannot be read: .*images/2.png"):
        coco_dataset(tmp_path / "images", path, train=False, check=True)
