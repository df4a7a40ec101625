"""Faster R-CNN over zoo backbones, the synthetic COCO dataset, pycocotools metrics, and a short
training run through ``attnconv train-det`` / ``eval-det``."""

from __future__ import annotations

import json
import time

import lightning as L
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from attnconv import list_models
from attnconv.cli import build_parser, main
from attnconv.detection import coco_box_metrics, coco_dataset, make_shapes_dataset
from attnconv.detection.config import DetectionConfig
from attnconv.detection.run import train
from attnconv.engine.config import apply, config_from_args, load_recipe
from attnconv.models.detection import create_backbone, fasterrcnn, load_backbone_weights
from attnconv.weights import safe_load

TINY = {"channels": (8, 16, 32, 64), "layers": (1, 1, 1, 1)}
SMALL_DET = dict(fpn_channels=16, representation_size=32, min_size=64, max_size=64,
                 anchor_sizes=(8, 16, 32, 64, 128))


def test_synthetic_shapes_are_deterministic_and_read_back_through_coco(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_train=6, num_val=3, image_size=64, seed=3)
    b = make_shapes_dataset(tmp_path / "b", num_train=6, num_val=3, image_size=64, seed=3)
    for split in ("train", "val"):
        ann_a = json.loads(getattr(a, split).annotations.read_text())
        assert ann_a == json.loads(getattr(b, split).annotations.read_text())
        for image in ann_a["images"]:
            name = image["file_name"]
            assert (getattr(a, split).images / name).read_bytes() == \
                (getattr(b, split).images / name).read_bytes()
    coco = json.loads(a.train.annotations.read_text())
    assert "synthetic" in coco["info"]["description"]
    assert [c["name"] for c in coco["categories"]] == ["rectangle", "ellipse", "triangle"]
    assert a.num_classes == 4
    assert len(coco["images"]) == 6 and 6 <= len(coco["annotations"]) <= 18
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64 and w >= 6 and h >= 6
        assert 0 < ann["area"] <= w * h

    dataset = coco_dataset(a.train.images, a.train.annotations, train=False)
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    first = [ann for ann in coco["annotations"] if ann["image_id"] == 1]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (f["bbox"] for f in first)])
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor).float(),
                               expected.float())
    assert target["labels"].tolist() == [f["category_id"] for f in first]

    other = make_shapes_dataset(tmp_path / "c", num_train=6, num_val=3, image_size=64, seed=4)
    assert other.train.annotations.read_text() != a.train.annotations.read_text()


def test_coco_metrics_of_perfect_and_of_no_detections(tmp_path):
    shapes = make_shapes_dataset(tmp_path, num_train=1, num_val=8, image_size=128, seed=0)
    gt = coco_dataset(shapes.val.images, shapes.val.annotations, train=False).coco
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in gt.dataset["annotations"]]
    metrics = coco_box_metrics(gt, perfect)
    assert metrics["AP"] == pytest.approx(100.0)
    assert metrics["AP50"] == pytest.approx(100.0)
    assert coco_box_metrics(gt, []) == dict.fromkeys(metrics, 0.0)
    wrong_class = [{**d, "category_id": d["category_id"] % 3 + 1} for d in perfect]
    assert coco_box_metrics(gt, wrong_class)["AP"] == pytest.approx(0.0)


BACKBONES = [n for n in list_models() if n.startswith(("resnet18", "resnet50"))]


@pytest.mark.parametrize("name", BACKBONES)
def test_fasterrcnn_builds_over_zoo_backbones(name, one_thread):
    torch.manual_seed(0)
    model = fasterrcnn(name, num_classes=4, backbone_args=TINY, **SMALL_DET).eval()
    body = model.backbone.body
    assert list(body.return_layers) == ["layer1", "layer2", "layer3", "layer4"]
    # Without pretrained weights everything trains, with ordinary BN (torchvision's rule).
    assert all(p.requires_grad for p in model.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    if "aw" in name:
        assert any(type(m).__name__ == "AWConv2d" for m in body.modules())
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64), torch.rand(3, 48, 80)])
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    assert out[1]["boxes"].shape[1] == 4


def test_backbone_weights_load_with_only_attention_missing(tmp_path, one_thread):
    torch.manual_seed(0)
    plain = create_backbone("resnet18", **TINY)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save({"state_dict": {**plain.state_dict(), "fc.weight": torch.zeros(10, 64)}}, path)

    model = fasterrcnn("resnet18_aw", num_classes=4, pretrained_backbone=path, backbone_args=TINY,
                       **SMALL_DET)
    body = model.backbone.body
    report = model.backbone.load_report
    assert report.new, "AW's pointconvs are not in a plain checkpoint"
    assert all(".conv1." in k for k in report.new)  # BasicBlock.conv1 is AW
    assert report.skipped == ["fc.weight"]  # the classifier, which a backbone lacks
    assert len(report.loaded) == len(plain.state_dict())
    torch.testing.assert_close(body.layer3[0].conv1.weight, plain.layer3[0].conv1.weight)
    # Pretrained: frozen BN everywhere, stem and layer1 frozen (trainable_layers=3).
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(body.bn1.running_mean, plain.bn1.running_mean)
    frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
    trained = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}

    # A plain-layer tensor missing means the checkpoint is for another network.
    state = plain.state_dict()
    del state["layer2.0.conv2.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights(create_backbone("resnet18_aw", **TINY), path)


#: Measured on the shared 2-core VM (seed 0, 200 steps of batch 4 on 96 px images, one thread):
#: AP 4.48, AP50 11.1 after 40 s. Untrained, AP is 0. The bounds keep about half as margin.
MIN_AP, MIN_AP50 = 2.0, 5.0


@pytest.mark.slow
def test_train_det_cli_raises_ap_on_synthetic_shapes(tmp_path, one_thread, capsys):
    start = time.perf_counter()
    main(["train-det", "--out_dir", str(tmp_path), "--name", "shapes", "--model", "resnet18",
          "--data.synthetic_train", "64", "--data.synthetic_val", "16",
          "--data.synthetic_size", "96", "--model_args", "{min_size: 96, max_size: 96}",
          "--trainer.max_steps", "200", "--trainer.max_epochs", "100",
          "--trainer.check_val_every_n_epoch", "1000", "--optim.milestones", "[1000]",
          "--optim.warmup_iters", "20", "--trainer.progress_bar", "false"])
    seconds = time.perf_counter() - start
    run = tmp_path / "shapes"
    metrics = json.loads((run / "coco_metrics.json").read_text())
    print(f"train-det: 200 steps in {seconds:.0f} s, AP {metrics['AP']:.2f}, "
          f"AP50 {metrics['AP50']:.2f}")
    assert metrics["AP"] > MIN_AP and metrics["AP50"] > MIN_AP50
    assert (run / "coco_metrics.csv").read_text().splitlines()[0] == \
        "model,AP,AP50,AP75,APs,APm,APl"
    assert "| model | AP | AP50 | AP75 | APs | APm | APl |" in capsys.readouterr().out

    main(["eval-det", str(run / "detector.pt"), "--run-dir", str(tmp_path / "eval")])
    again = json.loads((tmp_path / "eval" / "coco_metrics.json").read_text())
    assert again.pop("model") == metrics.pop("model") == "resnet18"
    assert again == pytest.approx(metrics, abs=1e-6)


def test_aw_coco_recipe_is_the_papers_1x_schedule():
    config = load_recipe("fasterrcnn_r101_aw_coco_1x", DetectionConfig)
    assert config.model == "resnet101_aw"
    assert config.trainer.max_epochs == 12 and list(config.optim.milestones) == [8, 11]
    assert config.optim.lr == 0.02 and config.optim.momentum == 0.9
    assert config.optim.weight_decay == 1e-4
    assert config.data.batch_size * int(config.trainer.devices) == 16
    assert config.model_args["min_size"] == 800 and config.model_args["max_size"] == 1333


TINY_DET = ["--model_args", "{backbone_args: {channels: [8, 8, 16, 16], layers: [1, 1, 1, 1]}, "
            "fpn_channels: 8, representation_size: 16, min_size: 48, max_size: 48, "
            "anchor_sizes: [8, 16, 32, 64, 128], rpn_pre_nms_top_n_train: 50, "
            "rpn_post_nms_top_n_train: 10, rpn_pre_nms_top_n_test: 50, "
            "rpn_post_nms_top_n_test: 10, box_batch_size_per_image: 8}",
            "--data.synthetic_train", "8", "--data.synthetic_val", "4",
            "--data.synthetic_size", "48", "--data.batch_size", "4", "--trainer.max_epochs", "2",
            "--trainer.progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--optim.warmup_iters", "2"]


def test_train_det_runs_on_the_shared_engine_and_eval_det_keeps_the_log(
        tmp_path, one_thread, capsys):
    main(["train-det", "--out_dir", str(tmp_path), "--name", "tiny", *TINY_DET])
    run = tmp_path / "tiny"
    # The metrics say which epoch and file they are from: detector.pt, the last epoch's.
    assert f"figures of epoch 2/2 (the last), {run / 'detector.pt'}" in capsys.readouterr().out
    # The engine's checkpoints (atomic, weights-only, resumable) and the detector file.
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert safe_load(run / "checkpoints" / "last.ckpt")["epoch"] == 1
    saved = safe_load(run / "detector.pt")
    assert saved["config"]["model_args"]["representation_size"] == 16
    assert saved["state_dict"]["roi_heads.box_head.fc7.weight"].shape == (16, 16)
    log = run / "logs" / "metrics.csv"
    before = log.read_text()
    assert "train/loss" in before.splitlines()[0]
    capsys.readouterr()
    # eval-det writes no logger into the run folder, which would erase the training log.
    main(["eval-det", str(run / "checkpoints" / "last.ckpt")])
    assert log.read_text() == before
    out = capsys.readouterr().out
    assert "| model | AP | AP50 |" in out
    assert f"figures of {run / 'checkpoints' / 'last.ckpt'} (epoch 2/2)" in out
    assert json.loads((run / "coco_metrics.json").read_text())["model"] == "resnet18"
    # The same engine rules as classification: the folder belongs to this run and its resumes.
    with pytest.raises(SystemExit) as exit_info:
        main(["train-det", "--out_dir", str(tmp_path), "--name", "tiny", *TINY_DET])
    assert exit_info.value.code == 2 and "holds an earlier run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train-det", "--out_dir", str(tmp_path), "--name", "tiny", *TINY_DET,
              "--resume", "last", "--optim.lr", "0.5"])
    assert exit_info.value.code == 2 and "optim.lr 0.02 -> 0.5" in capsys.readouterr().err


def test_train_det_config_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-det", "--out_dir", str(tmp_path), "--trainer.max_epochs", "ten"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("attnconv train-det: error: trainer.max_epochs must be "
                                       "an integer, not 'ten'\n")


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.should_stop = True


def _tiny_det_config(out_dir, name: str) -> DetectionConfig:
    args = build_parser().parse_args(
        ["train-det", "--out_dir", str(out_dir), "--name", name, *TINY_DET,
         "--data.synthetic_train", "12", "--trainer.max_epochs", "3",
         "--trainer.deterministic", "true"])
    return config_from_args(args, DetectionConfig())


@pytest.mark.slow
def test_a_stopped_and_resumed_detection_run_ends_with_the_same_weights(tmp_path, one_thread):
    # 12 images in batches of 4: 3 steps per epoch, flips drawn, warm-up across the boundary.
    whole = train(_tiny_det_config(tmp_path, "whole"))
    stopped = _tiny_det_config(tmp_path, "stopped")
    train(stopped, callbacks=[_StopAfterFirstEpoch()])
    assert safe_load(tmp_path / "stopped" / "checkpoints" / "last.ckpt")["epoch"] == 0
    resumed = train(apply(stopped, {"resume": "last"}))
    expected = safe_load(tmp_path / "whole" / "checkpoints" / "last.ckpt")["state_dict"]
    got = safe_load(tmp_path / "stopped" / "checkpoints" / "last.ckpt")["state_dict"]
    assert expected.keys() == got.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}"
    assert resumed.metrics == whole.metrics
