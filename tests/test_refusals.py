"""Bad input to export, bench, viz, the checkpoint loaders, detection, segmentation and the
YOLO blocks: each is refused in one line that names what is wrong (no traceback, exit status 2
on the command line), before any work is done."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from attnconv.classification.config import ClassificationConfig
from attnconv.classification.models import build_model
from attnconv.cli import main
from attnconv.errors import DataError
from attnconv.export import ExportError, export_onnx
from attnconv.models import create_model
from attnconv.pretrained import InitError, init_from
from attnconv.segmentation.data import MaskFolder, build_segmentation_sets

#: A narrow resnet18, so that checkpoints stay small.
NARROW = {"channels": [8, 8, 8, 8]}


def _classifier_checkpoint(path: Path, model: str, num_classes: int, sizes: bool = True) -> None:
    """An ``attnconv train`` checkpoint holding a narrow resnet18 of 10 classes whose metadata
    names ``model`` and ``num_classes`` (neither, nor the input size, without ``sizes``)."""
    config = ClassificationConfig().to_dict()
    config.update(model=model, model_args=NARROW)
    meta = {"config": config}
    if sizes:
        meta.update(num_classes=num_classes, in_chans=1, image_size=16)
    weights = build_model("resnet18", 10, 1, **NARROW).state_dict()
    torch.save({"attnconv": meta, "state_dict": {f"model.{k}": v for k, v in weights.items()}},
               path)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    _classifier_checkpoint(tmp_path / "other_model.ckpt", "resnet18_aw", 10)
    _classifier_checkpoint(tmp_path / "other_classes.ckpt", "resnet18", 7)
    _classifier_checkpoint(tmp_path / "no_meta.ckpt", "resnet18", 10, sizes=False)
    (tmp_path / "fake.safetensors").write_text("not a safetensors file")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "0.png")
    image = [{"id": 1, "file_name": "0.png", "width": 32, "height": 32}]
    category = [{"id": 1, "name": "thing"}]
    (tmp_path / "annotations_dict.json").write_text(json.dumps(
        {"images": image, "annotations": {"bbox": [1, 1, 8, 8]}, "categories": category}))
    (tmp_path / "annotations_list.json").write_text(json.dumps([image, category]))
    return tmp_path


SMALL = ["--input-size", "3", "16", "16"]


@pytest.mark.parametrize(("argv", "message"), [
    (["export", "resnet18", "--opset", "7", *SMALL], "opset must be 18 to 23"),
    (["export", "resnet18", "--opset", "0", *SMALL], "opset must be 18 to 23"),
    (["export", "resnet18", "--opset", "999", *SMALL], "opset must be 18 to 23"),
    (["export", "resnet18", "--input-size", "0", "16", "16"],
     "input_size must be 3 numbers >= 1 (channels, height, width), not 0 16 16"),
    (["export", "resnet18", "--input-size", "3", "-1", "16"], "input_size must be 3 numbers"),
    (["export", "resnet18", "--batch-size", "0", *SMALL], "batch_size must be >= 1, not 0"),
    (["export", "resnet18", "--output", "{tmp}", *SMALL], "is a folder; give the ONNX file"),
    (["bench", "resnet18", "--batch-size", "0", *SMALL], "batch_size must be >= 1, not 0"),
    (["bench", "resnet18", "--repeats", "0", *SMALL], "repeats must be >= 1, not 0"),
    (["bench", "resnet18", "--threads", "0", *SMALL], "--threads: expected a thread count >= 1"),
    (["bench", "resnet18", "--device", "bogus", *SMALL],
     "device must be cpu, cuda or cuda:N, not 'bogus'"),
    (["bench", "resnet18", "--input-size", "3", "0", "0"], "input_size must be 3 numbers >= 1"),
    (["bench", "resnet18", "--num-classes", "-3", *SMALL], "num_classes must be >= 1, not -3"),
    (["viz", "--model", "resnet18_aw", "--size", "0", "--out", "{tmp}/viz"],
     "size must be >= 1 (the side of the square image), not 0"),  # hung at size 224
    (["viz", "--model", "resnet18_aw", "--size", "-5", "--out", "{tmp}/viz"],
     "size must be >= 1"),
    (["viz", "--model", "resnet18_aw", "--size", "16", "--image", "{tmp}/notes.txt", "--out",
      "{tmp}/viz"], "cannot read image {tmp}/notes.txt: UnidentifiedImageError"),
    (["viz", "--model", "resnet18_aw", "--size", "16", "--out", "{tmp}/a_file"],
     "out {tmp}/a_file is a file; viz writes its figures into a folder"),
    (["eval", "--checkpoint", "{tmp}/other_model.ckpt"],
     "other_model.ckpt: its weights do not fit the 'resnet18_aw' with 10 classes its metadata "
     "names: Missing key(s)"),
    (["eval", "--checkpoint", "{tmp}/other_classes.ckpt"],
     "other_classes.ckpt: its weights do not fit the 'resnet18' with 7 classes its metadata "
     "names: size mismatch for fc.weight"),
    (["export", "resnet18_aw", "--checkpoint", "{tmp}/other_model.ckpt"], "Missing key(s)"),
    (["viz", "--model", "resnet18", "--checkpoint", "{tmp}/other_classes.ckpt", "--out",
      "{tmp}/viz"], "size mismatch for fc.weight"),
    (["eval", "--checkpoint", "{tmp}/no_meta.ckpt"],  # not "is a detection checkpoint"
     "no_meta.ckpt is a checkpoint of `attnconv train` without num_classes, in_chans, "
     "image_size in its metadata"),
    (["export", "resnet18", "--checkpoint", "{tmp}/fake.safetensors"],
     "fake.safetensors is not a readable safetensors file"),
    (["train-det", "--model_args", "{min_size: -1}", "--out_dir", "{tmp}/runs"],
     "model_args: min_size must be a side in pixels >= 1 (or a list of them), not -1"),
    (["train-det", "--data.train_images", "{tmp}/images", "--data.train_annotations",
      "{tmp}/annotations_dict.json", "--data.val_images", "{tmp}/images",
      "--data.val_annotations", "{tmp}/annotations_dict.json", "--out_dir", "{tmp}/runs"],
     "'annotations' of {tmp}/annotations_dict.json must be a list of objects (COCO's layout), "
     "not an object"),
    (["train-det", "--data.train_images", "{tmp}/images", "--data.train_annotations",
      "{tmp}/annotations_list.json", "--data.val_images", "{tmp}/images",
      "--data.val_annotations", "{tmp}/annotations_list.json", "--out_dir", "{tmp}/runs"],
     "annotations_list.json must hold a JSON object with 'images', 'annotations' and "
     "'categories' lists (COCO's layout), not a list"),
])
def test_bad_input_is_refused_in_one_line(argv: list[str], message: str, files: Path,
                                          capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(files)
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(files)) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"attnconv {argv[0]}: ") and message.replace("{tmp}", str(files)) in last
    if "--threads" not in message:  # argparse prints its usage above its refusal
        assert err.count("\n") == 1, err
    assert not list(files.glob("*.onnx")) and not (files / "viz").exists()


def test_bench_refuses_cuda_without_a_gpu(capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "resnet18", "--device", "cuda", *SMALL])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "attnconv bench: error: device cuda: torch sees no CUDA GPU here; use cpu\n"


def test_an_opset_the_exporter_did_not_write_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def exporter_keeping_opset_18(model, args, path, **kwargs) -> None:
        graph = onnx.helper.make_graph([], "g", [], [])
        onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]),
                  path)

    monkeypatch.setattr(torch.onnx, "export", exporter_keeping_opset_18)
    with pytest.raises(ExportError, match="could not write opset 20 \\(it wrote 18\\)"):
        export_onnx(nn.Conv2d(3, 4, 3), tmp_path / "m.onnx", input_size=(3, 8, 8), opset=20,
                    verify=False)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_export_writes_the_opset_asked_for(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    export_onnx(net, tmp_path / "m.onnx", input_size=(3, 8, 8), opset=21)
    versions = [o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import
                if o.domain in ("", "ai.onnx")]
    assert versions == [21]  # was 18 whatever was asked


def test_init_weights_with_nan_or_inf_blame_the_file(tmp_path: Path) -> None:
    # Were loaded, and training stopped at once with "lower optim.lr".
    weights = create_model("resnet18", num_classes=3, **NARROW).state_dict()
    weights["layer2.0.conv1.weight"].view(-1)[0] = float("inf")
    torch.save(weights, tmp_path / "init.pt")
    with pytest.raises(InitError, match=r"init.pt holds NaN or Inf weights in 1 tensor\(s\), "
                                        r"e.g. layer2.0.conv1.weight"):
        init_from(create_model("resnet18", num_classes=3, **NARROW), str(tmp_path / "init.pt"))


def _mask_folder(root: Path, mask_value: int | None = None) -> Path:
    """ROOT/{images,masks}/{train,val}/*.png: 4 pairs of 32 px per split; masks of class ids
    0..2, or all ``mask_value``."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for kind in ("images", "masks"):
            (root / kind / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{i}.png")
            mask = (rng.integers(0, 3, (32, 32)) if mask_value is None
                    else np.full((32, 32), mask_value))
            Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / split / f"{i}.png")
    return root


def _folder_sets(root: Path):
    return build_segmentation_sets("folder", root, crop_size=32, base_size=32, num_classes=3)


@pytest.mark.parametrize("kind", ["images", "masks"])
def test_a_corrupt_segmentation_file_is_named(kind: str, tmp_path: Path) -> None:
    root = _mask_folder(tmp_path)
    broken = root / kind / "train" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    pairs = _folder_sets(root).train
    pairs[0]  # the others still read
    with pytest.raises(DataError, match=f"cannot read {kind[:-1]} {broken}"):
        pairs[1]
    with pytest.raises(DataError, match=f"cannot read {kind[:-1]} {broken}"):
        MaskFolder(root / "images" / "train", root / "masks" / "train")[1]


def test_masks_without_a_labelled_pixel_blame_the_data(tmp_path: Path) -> None:
    # Not a stop at the first non-finite loss with "lower optim.lr": the data is at fault.
    with pytest.raises(DataError, match="every mask of the folder training set is 255 "
                                        r"\(ignore\) everywhere"):
        _folder_sets(_mask_folder(tmp_path, mask_value=255))
    assert _folder_sets(_mask_folder(tmp_path / "usual")).num_classes == 3


@pytest.mark.parametrize(("argv", "message"), [
    (["--data.batch_size", "1"],  # not BatchNorm's "Expected more than 1 value per channel"
     "data.batch_size must be >= 2 for head deeplabv3"),
    (["--init", "{tmp}/init.pt"], "init.pt holds NaN or Inf weights"),
])
def test_train_seg_refuses_before_training(argv: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    from attnconv.models.segmentation import create_segmentation_model
    from attnconv.segmentation.config import SegmentationConfig

    cfg = SegmentationConfig()
    model = create_segmentation_model(cfg.head, cfg.model, 3, **cfg.model_args)
    weights = {k.removeprefix("backbone."): v.clone() for k, v in model.state_dict().items()
               if k.startswith("backbone.")}
    weights["conv1.weight"].view(-1)[0] = float("nan")
    torch.save(weights, tmp_path / "init.pt")
    root = _mask_folder(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        main(["train-seg", "--data.name", "folder", "--data.root", str(root),
              "--data.num_classes", "3", "--out_dir", str(tmp_path / "runs"),
              *[a.replace("{tmp}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.startswith("attnconv train-seg: error: ") and message.replace(
        "{tmp}", str(tmp_path)) in err and err.count("\n") == 1, err
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_a_dilated_rfa_yolo_block_is_refused_for_its_dilation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As tests/test_yolo.py: ultralytics reads these on import and must not go online.
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics", reason="the attnconv[yolo] extra is not installed")
    from attnconv.integrations.ultralytics import RFAConv

    # [RFAConv, [128, 3, 2, None, 1, 2]]: was "padding must be None or kernel_size // 2".
    with pytest.raises(ValueError, match="dilation must be 1"):
        RFAConv(64, 128, 3, 2, None, 1, 2)
    assert RFAConv(64, 128, 3, 2, None, 1, 1).conv.padding == (1, 1)  # autopad's k // 2
