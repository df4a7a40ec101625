"""Every shipped recipe builds the network of its paper (built and looked at, never trained),
and recipes load by name with nothing of one leaking into another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from attnconv.analysis.profiling import count_params
from attnconv.classification.config import ClassificationConfig
from attnconv.classification.models import build_model
from attnconv.detection.config import SYNTHETIC_MODEL_ARGS, DetectionConfig
from attnconv.detection.run import build_detector
from attnconv.engine.config import ConfigError, apply, load_recipe
from attnconv.layers import AWConv2d, RFAConv2d
from attnconv.models import create_model
from attnconv.models.detection import fasterrcnn
from attnconv.recipes import list_recipes, recipe_path

CLASSIFICATION = {"cifar10", "cifar100", "demo", "fashion_mnist", "imagenet_resnet_aw",
                  "imagenet_rfaconv",
                  # fine-tuning recipes: their networks are tested in tests/test_pretrained.py
                  "finetune_cifar10", "finetune_cifar100", "finetune_imagenet_resnet18_rfa",
                  "finetune_imagenet_resnet50_aw", "finetune_imagenet_resnet101_aw"}
DETECTION = {"fasterrcnn_r101_aw_coco_1x"}
# Its network is tested in tests/test_segmentation.py (test_recipe_builds_the_papers_network).
SEGMENTATION = {"deeplabv3_voc_aug"}


def test_every_shipped_recipe_has_a_test_below() -> None:
    # A recipe added later must be added here, and get a test of the network it builds.
    assert set(list_recipes()) == CLASSIFICATION | DETECTION | SEGMENTATION


def test_recipes_load_by_name_or_path(tmp_path: Path) -> None:
    by_name = load_recipe("imagenet_rfaconv", ClassificationConfig)
    assert load_recipe(recipe_path("imagenet_rfaconv"), ClassificationConfig) == by_name
    assert load_recipe("imagenet_rfaconv.yaml", ClassificationConfig) == by_name
    own = tmp_path / "mine.yaml"
    own.write_text("model: resnet34_rfa\n")
    assert load_recipe(own, ClassificationConfig).model == "resnet34_rfa"
    with pytest.raises(ConfigError, match="did you mean imagenet_rfaconv"):
        load_recipe("imagenet_rfaconf", ClassificationConfig)


def test_recipes_ship_inside_the_package() -> None:
    import attnconv

    assert recipe_path("demo").parent == Path(attnconv.__file__).parent / "recipes"


def test_a_recipe_states_the_whole_model() -> None:
    # Were a recipe's model_args merged into narrower defaults, imagenet_rfaconv would train a
    # quarter-width ResNet-18.
    assert ClassificationConfig().model_args == {}
    narrow = apply(ClassificationConfig(), {"model_args": {"channels": [8, 16, 32, 64]}})
    assert load_recipe("imagenet_rfaconv", narrow).model_args == {"cifar_stem": False}
    assert DetectionConfig().model_args == SYNTHETIC_MODEL_ARGS
    coco = load_recipe("fasterrcnn_r101_aw_coco_1x", DetectionConfig)
    assert "representation_size" in coco.model_args and coco.model_args["fpn_channels"] == 256


def test_every_recipe_names_its_task_and_another_task_refuses_it() -> None:
    from attnconv.engine.config import RunConfig, read_recipe
    from attnconv.segmentation.config import SegmentationConfig

    tasks = {c.task: c for c in (ClassificationConfig, DetectionConfig, SegmentationConfig)}
    assert tasks == RunConfig.TASKS
    for name in list_recipes():
        task = read_recipe(recipe_path(name)).get("task")
        assert task == ("detection" if name in DETECTION else "segmentation"
                        if name in SEGMENTATION else "classification"), name
        assert load_recipe(name, tasks[task]).task == task
        for other in set(tasks) - {task}:
            with pytest.raises(ConfigError, match=rf"recipe {name} is for {task}, not {other}: "
                                                  rf"use attnconv {tasks[task].command} "):
                load_recipe(name, tasks[other])


def _network(name: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """What `attnconv train --config NAME` would build (train() calls build_model so)."""
    cfg = load_recipe(name, ClassificationConfig)
    return build_model(cfg.model, num_classes, in_chans, **cfg.model_args)


def _imagenet_stem(model: nn.Module) -> bool:
    return model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2) and \
        isinstance(model.maxpool, nn.MaxPool2d)


def test_imagenet_rfaconv_builds_the_papers_resnet18_rfa() -> None:
    model = _network("imagenet_rfaconv", 1000)
    # RFAConv paper, Table 1: ResNet-18 + RFAConv, 11.85M parameters.
    assert round(count_params(model) / 1e6, 2) == 11.85
    assert _imagenet_stem(model) and model.num_features == 512
    assert sum(isinstance(m, RFAConv2d) for m in model.modules()) == 8  # one per BasicBlock


@pytest.mark.slow
def test_imagenet_resnet_aw_builds_the_full_width_resnet101_aw() -> None:
    model = _network("imagenet_resnet_aw", 1000)
    reference = create_model("resnet101_aw", num_classes=1000)
    assert count_params(model) == count_params(reference)
    assert model.num_features == 2048 and [len(s) for s in
                                           (model.layer1, model.layer2, model.layer3,
                                            model.layer4)] == [3, 4, 23, 3]
    assert _imagenet_stem(model)
    assert sum(isinstance(m, AWConv2d) for m in model.modules()) == 33  # every bottleneck 3x3
    plain = count_params(create_model("resnet101", num_classes=1000))
    assert plain == 44_549_160  # torchvision's ResNet-101: the AW net is that plus attention


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_recipes_build_the_full_width_cifar_stem_resnet18(name: str, classes: int
                                                                ) -> None:
    model = _network(name, classes)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert [model.layer1[0].conv1.out_channels, model.layer4[0].conv1.out_channels] == [64, 512]
    assert model.fc.out_features == classes
    # 11.17M at 10 classes: the ResNet-18 of the CIFAR literature.
    assert count_params(model) == 11_173_962 + 512 * (classes - 10) + (classes - 10)


def test_demo_recipe_builds_the_narrow_digits_network() -> None:
    model = _network("demo", 10, in_chans=1)
    assert model.conv1.in_channels == 1 and isinstance(model.maxpool, nn.Identity)
    assert model.num_features == 64


def test_fashion_mnist_recipe_builds_the_demos_network_on_one_channel() -> None:
    cfg = load_recipe("fashion_mnist", ClassificationConfig)
    assert cfg.model_args == load_recipe("demo", ClassificationConfig).model_args
    assert (cfg.data.name, cfg.data.image_size, cfg.data.crop) == ("fashion_mnist", 28, "cifar")
    model = _network("fashion_mnist", 10, in_chans=1)
    assert model.conv1.in_channels == 1 and model.num_features == 64


@pytest.mark.parametrize("name", ["imagenet_resnet_aw", "imagenet_rfaconv",
                                  "finetune_imagenet_resnet18_rfa",
                                  "finetune_imagenet_resnet50_aw",
                                  "finetune_imagenet_resnet101_aw"])
def test_imagenet_recipes_ask_for_the_imagenet_crop(name: str) -> None:
    assert load_recipe(name, ClassificationConfig).data.crop == "imagenet"


@pytest.mark.slow
def test_coco_recipe_builds_a_detector_whose_box_head_has_the_recipes_width() -> None:
    cfg = load_recipe("fasterrcnn_r101_aw_coco_1x", DetectionConfig)
    torch.manual_seed(0)
    detector = build_detector(cfg, cfg.data.num_classes)
    width = cfg.model_args["representation_size"]
    head = detector.roi_heads.box_head
    assert (head.fc6.out_features, head.fc7.out_features) == (width, width)
    assert head.fc6.in_features == cfg.model_args["fpn_channels"] * 7 * 7
    assert detector.roi_heads.box_predictor.cls_score.in_features == width
    assert detector.roi_heads.box_predictor.cls_score.out_features == 91
    body = detector.backbone.body
    assert sum(isinstance(m, AWConv2d) for m in body.modules()) == 33
    assert (detector.transform.min_size, detector.transform.max_size) == ((800,), 1333)


def test_representation_size_sets_the_box_head_width() -> None:
    # torchvision would pass it on to its transform, which ignores it (always 1024).
    small = {"backbone_args": {"channels": [8, 8, 16, 16], "layers": [1, 1, 1, 1]},
             "fpn_channels": 16}
    detector = fasterrcnn("resnet18", 5, representation_size=48, **small)
    assert detector.roi_heads.box_head.fc7.out_features == 48
    assert detector.roi_heads.box_predictor.bbox_pred.out_features == 5 * 4
    with pytest.raises(TypeError, match="representation_sise; did you mean representation_size"):
        fasterrcnn("resnet18", 5, representation_sise=48, **small)
