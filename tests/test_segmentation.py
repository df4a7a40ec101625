"""Semantic segmentation: DeepLabV3 / FCN over zoo ResNets with torchvision's dilation, where the
RFA layers can go, the generated and VOC-layout data with their one-line errors, torchmetrics
IoU against a confusion-matrix reference, the Lightning task, the recipe, and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from attnconv.analysis.profiling import count_params
from attnconv.cli import main
from attnconv.detection.synthetic import make_shapes_dataset
from attnconv.engine.config import ConfigError, apply, load_recipe
from attnconv.errors import DataError
from attnconv.layers import AWConv2d, RFAConv2d, RFCAConv2d, RFCBAMConv2d
from attnconv.models.segmentation import (
    deeplabv3,
    fcn,
    output_stride,
    segmentation_backbone,
    undilated_block_convs,
)
from attnconv.segmentation import (
    IGNORE_INDEX,
    MaskFolder,
    SegmentationMetrics,
    build_segmentation_sets,
    iou_table,
    shapes_segmentation,
)
from attnconv.segmentation.config import SegmentationConfig, SegOptimConfig
from attnconv.segmentation.data import (
    SegmentationPairs,
    pad_collate,
    train_transforms,
    voc_segmentation,
)
from attnconv.segmentation.module import Segmenter, poly_factor
from attnconv.segmentation.run import build_model, evaluate

NARROW = {"channels": (8, 16, 32, 64)}
DILATIONS = [(False, False, False), (False, False, True), (False, True, True)]


# --- models --------------------------------------------------------------------------------

@pytest.mark.parametrize("dilation", DILATIONS)
def test_dilation_is_torchvisions(dilation):
    """Every conv of a zoo bottleneck ResNet has the stride, dilation and padding of
    torchvision's ResNet(replace_stride_with_dilation=...) (two blocks per stage: fast)."""
    ours, _ = segmentation_backbone("resnet50", dilation, backbone_args={"layers": (2, 2, 2, 2)})
    theirs = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [2, 2, 2, 2],
                                              replace_stride_with_dilation=list(dilation))
    convs = {n: m for n, m in theirs.named_modules() if isinstance(m, nn.Conv2d)}
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)}
    assert mine.keys() == convs.keys()
    for name, conv in convs.items():
        assert (mine[name].stride, mine[name].dilation, mine[name].padding) == \
            (conv.stride, conv.dilation, conv.padding), name
    assert output_stride(dilation) == {0: 32, 1: 16, 2: 8}[sum(dilation)]


@pytest.mark.parametrize(("build", "head"), [(deeplabv3, DeepLabHead), (fcn, FCNHead)])
@pytest.mark.parametrize("dilation", DILATIONS)
def test_heads_and_output_stride(build, head, dilation, one_thread):
    model = build("resnet18", 5, aux_loss=True, replace_stride_with_dilation=dilation,
                  backbone_args=NARROW).eval()
    assert isinstance(model.classifier, head)
    assert isinstance(model.aux_classifier, FCNHead)
    # The heads read the backbone's real widths: layer4 (64) and layer3 (32) of NARROW.
    first = next(m for m in model.classifier.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 64
    assert model.aux_classifier[0].in_channels == 32
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.backbone(x)
        out = model(x)
    assert features["out"].shape[-1] == 64 // output_stride(dilation)
    assert out["out"].shape == out["aux"].shape == (2, 5, 64, 64)
    assert "aux" not in build("resnet18", 5, backbone_args=NARROW).eval()(x)


def test_bad_model_options():
    with pytest.raises(ValueError, match="replace_stride_with_dilation must be one of"):
        deeplabv3("resnet18", 3, replace_stride_with_dilation=(True, True, True))
    with pytest.raises(ValueError, match="dilated_convs must be"):
        deeplabv3("resnet18", 3, dilated_convs="drop")
    with pytest.raises(ValueError, match="unknown model 'resnet18_rfx'"):
        deeplabv3("resnet18_rfx", 3)


#: Block convs with dilation 1 under each setting (a dilated stage's first block keeps the
#: previous stage's dilation): where the RFA layers can go.
UNDILATED = {
    (False, False, False): [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)],
    (False, False, True): [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in (0, 1)]
    + ["layer4.0.conv1"],
    (False, True, True): [f"layer{s}.{b}.conv1" for s in (1, 2) for b in (0, 1)]
    + ["layer3.0.conv1"],
}


@pytest.mark.parametrize(("name", "layer"), [("resnet18_rfa", RFAConv2d),
                                             ("resnet18_rfcbam", RFCBAMConv2d),
                                             ("resnet18_rfca", RFCAConv2d)])
@pytest.mark.parametrize("dilation", DILATIONS)
def test_where_the_rfa_layers_go(name, layer, dilation, one_thread):
    if dilation == (False, False, False):
        model, _ = segmentation_backbone(name, dilation, backbone_args=NARROW)
    else:
        with pytest.raises(ValueError, match="reject dilation") as err:
            segmentation_backbone(name, dilation, backbone_args=NARROW)
        assert "\n" not in str(err.value)
        assert ", ".join(UNDILATED[dilation]) in str(err.value)  # the error says where
        model, _ = segmentation_backbone(name, dilation, dilated_convs="plain",
                                         backbone_args=NARROW)
    assert undilated_block_convs(model) == UNDILATED[dilation]
    for conv_name in model.block_conv_names():
        conv = model.get_submodule(conv_name)
        if conv_name in UNDILATED[dilation]:
            assert type(conv) is layer
            assert conv.bias is not None  # the paper's layers keep their final conv's bias
        else:
            # Kept plain as a plain ResNet's conv (no bias): ImageNet weights fit it.
            assert type(conv) is nn.Conv2d and conv.dilation[0] > 1 and conv.bias is None
    # The second conv of every block stays plain, as in the paper's ResNets.
    assert all(type(model.get_submodule(f"layer{s}.{b}.conv2")) is nn.Conv2d
               for s in (1, 2, 3, 4) for b in (0, 1))
    # RFA's own initialisation ran (near-uniform softmax: small logit scales, not ones).
    if layer is RFAConv2d:
        scale = model.get_submodule(UNDILATED[dilation][0]).attn_logit_scale
        assert not torch.allclose(scale, torch.ones_like(scale))
    with torch.no_grad():
        out = deeplabv3(model, 3).eval()(torch.rand(1, 3, 64, 64))["out"]
    assert out.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("name", ["resnet18_aw", "resnet50_se_aw"])
def test_aw_backbones_dilate_and_start_as_the_plain_network(name, one_thread):
    """AW takes dilation; at initialisation (A = 0) the dilated AW backbone computes exactly the
    dilated plain backbone with the same weights."""
    model, _ = segmentation_backbone(name, (False, True, True), backbone_args=NARROW)
    plain_name = {"resnet18_aw": "resnet18", "resnet50_se_aw": "seresnet50"}[name]
    plain, _ = segmentation_backbone(plain_name, (False, True, True), backbone_args=NARROW)
    aw = {n: m for n, m in model.named_modules() if isinstance(m, AWConv2d)}
    assert sorted(aw) == sorted(model.block_conv_names())
    assert {m.dilation for m in aw.values()} == {(1, 1), (2, 2), (4, 4)}
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys
    model, plain = model.double().eval(), plain.double().eval()
    x = torch.rand(2, 3, 48, 48, dtype=torch.float64)
    torch.testing.assert_close(model.forward_features(x), plain.forward_features(x))


@pytest.mark.parametrize(("name", "dilated_convs"), [("resnet18_aw", "error"),
                                                    ("resnet18_rfa", "plain")])
def test_plain_imagenet_weights_start_the_backbone(name, dilated_convs, tmp_path):
    plain = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
    torch.save(plain.state_dict(), tmp_path / "r18.pth")
    model = deeplabv3(name, 3, pretrained_backbone=tmp_path / "r18.pth",
                      dilated_convs=dilated_convs)
    assert model.load_report.new  # the attention tensors are not in the file
    assert all(".conv1." in k for k in model.load_report.new)
    assert model.load_report.skipped == ["fc.weight", "fc.bias"]
    for stage in ("layer2", "layer4"):  # attention conv, and (RFA) a conv kept plain
        torch.testing.assert_close(model.backbone[stage][1].conv1.weight,
                                   getattr(plain, stage)[1].conv1.weight)


# --- data ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, shapes_segmentation(root, num_train=6, num_val=3, image_size=48)


def test_generated_masks_match_the_annotations(shapes, tmp_path):
    root, (train, val) = shapes
    assert (len(train), len(val)) == (6, 3)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    for image in coco["images"]:
        mask = np.asarray(Image.open(root / "masks" / "train" / image["file_name"]))
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        for a in anns:
            x, y, w, h = a["bbox"]
            inside = mask[y:y + h, x:x + w] == a["category_id"]
            assert inside.sum() == a["area"]  # the mask is the annotated shape, whole
        assert (mask > 0).sum() == sum(a["area"] for a in anns)  # and nothing else
    # Writing masks draws no random numbers: the images are those of masks=False.
    again = make_shapes_dataset(tmp_path, num_train=6, num_val=3, image_size=48)
    for image in coco["images"]:
        assert (again.train.images / image["file_name"]).read_bytes() == \
            (root / "train" / image["file_name"]).read_bytes()


def test_image_without_mask_is_a_one_line_error(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / f"{stem}.png")
    Image.new("L", (8, 8)).save(tmp_path / "msk" / "a.png")
    with pytest.raises(DataError, match=r"b\.png has no mask .*b\.png \(1 of 2 images") as err:
        MaskFolder(tmp_path / "img", tmp_path / "msk")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        MaskFolder(tmp_path / "img", tmp_path / "nothing")


def test_mask_with_unknown_class_id_is_a_one_line_error(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0], mask[1, 1] = 7, IGNORE_INDEX  # 255 is allowed, 7 is not with 4 classes
    Image.fromarray(mask).save(tmp_path / "msk" / "a.png")
    data = SegmentationPairs(MaskFolder(tmp_path / "img", tmp_path / "msk"), 4)
    with pytest.raises(DataError, match=r"a\.png: mask holds class id 7, but the dataset has 4 "
                       r"classes \(ids 0\.\.3, 255 = ignore\)") as err:
        data[0]
    assert "\n" not in str(err.value)
    mask[0, 0] = 3
    Image.fromarray(mask).save(tmp_path / "msk" / "a.png")
    _, target = data[0]
    assert target[1, 1] == IGNORE_INDEX and target[0, 0] == 3


def _half_size_mask_folder(root: Path, mask_size: tuple[int, int]) -> None:
    """folder-layout data whose one image (16x12: left half class 1, right half class 2) has
    a mask of ``mask_size`` (width, height) with the same two halves."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        pixels = np.zeros((12, 16, 3), np.uint8)
        pixels[:, 8:] = 200
        Image.fromarray(pixels).save(root / "images" / split / "a.png")
        width, height = mask_size
        mask = np.ones((height, width), np.uint8)
        mask[:, width // 2:] = 2
        Image.fromarray(mask).save(root / "masks" / split / "a.png")


def test_mask_of_another_size_is_resized_with_its_image(tmp_path):
    # Before, validation resized only the image and pad_collate pasted the half-size mask into
    # the top-left corner: half the labels sat on the wrong pixels.
    _half_size_mask_folder(tmp_path, (8, 6))
    sets = build_segmentation_sets("folder", tmp_path, crop_size=12, base_size=12,
                                   num_classes=3)
    image, mask = sets.val[0]
    assert mask.shape == image.shape[-2:] == (12, 16)
    assert (mask[:, :8] == 1).all() and (mask[:, 8:] == 2).all()
    _, masks = pad_collate([sets.val[0], sets.val[0]])
    assert (masks != IGNORE_INDEX).all()
    torch.manual_seed(0)
    image, mask = sets.train[0]  # the same rule in training: image and mask move together
    assert mask.shape == image.shape[-2:]
    bright = image[0] > 0  # the right half of the image (class 2), after normalisation
    assert (mask[bright & (mask != IGNORE_INDEX)] == 2).all()


def test_mask_of_another_aspect_ratio_is_a_one_line_error(tmp_path):
    _half_size_mask_folder(tmp_path, (12, 12))
    sets = build_segmentation_sets("folder", tmp_path, crop_size=12, base_size=12,
                                   num_classes=3)
    for split in (sets.train, sets.val):
        with pytest.raises(DataError, match=r"masks/(train|val)/a\.png: mask is 12x12 but its "
                           r"image is 16x12 \(another aspect ratio\)") as err:
            split[0]
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"mask \(6, 8\) and image \(12, 16\) differ"):
        pad_collate([(torch.zeros(3, 12, 16), torch.zeros(6, 8, dtype=torch.int64))])


def test_wrong_voc_root_is_a_one_line_error(tmp_path):
    for call in (lambda: voc_segmentation(tmp_path / "nowhere"),
                 lambda: build_segmentation_sets("voc_aug", tmp_path, crop_size=8, base_size=8,
                                                 sbd_root=tmp_path / "sbd")):
        with pytest.raises(DataError, match="no VOC2012 segmentation data under") as err:
            call()
        assert "VOCdevkit/VOC2012/JPEGImages" in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"data\.root is required"):
        build_segmentation_sets("voc", None, crop_size=8, base_size=8)
    with pytest.raises(DataError, match=r"data\.sbd_root is required"):
        build_segmentation_sets("voc_aug", tmp_path, crop_size=8, base_size=8)
    with pytest.raises(DataError, match=r"unknown data\.name 'vocc'"):
        build_segmentation_sets("vocc", tmp_path, crop_size=8, base_size=8)


def _voc_tree(root: Path) -> None:
    """A two-image VOC tree in torchvision's layout: images, palette masks with 255 borders."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    for split, stem in (("train", "2007_000032"), ("val", "2007_000033")):
        Image.new("RGB", (20, 16), (90, 20, 10)).save(voc / "JPEGImages" / f"{stem}.jpg")
        mask = Image.fromarray(np.pad(np.full((12, 16), 15, np.uint8), 2,
                                      constant_values=IGNORE_INDEX), mode="L").convert("P")
        mask.save(voc / "SegmentationClass" / f"{stem}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(stem + "\n")


def test_voc_aug_adds_sbd_images_once(tmp_path):
    """SBD in torchvision's layout (img/, cls/*.mat, train_noval.txt): its images that VOC
    train already has are not counted twice."""
    from scipy.io import savemat

    _voc_tree(tmp_path / "voc")
    sbd = tmp_path / "sbd"
    (sbd / "img").mkdir(parents=True)
    (sbd / "cls").mkdir()
    for stem in ("2007_000032", "2008_000002"):  # the first is also in VOC train
        Image.new("RGB", (12, 10)).save(sbd / "img" / f"{stem}.jpg")
        savemat(sbd / "cls" / f"{stem}.mat", {"GTcls": {"Segmentation": np.full(
            (10, 12), 7, np.uint8)}})
    (sbd / "train_noval.txt").write_text("2007_000032\n2008_000002\n")
    sets = build_segmentation_sets("voc_aug", tmp_path / "voc", sbd_root=sbd, crop_size=8,
                                   base_size=8)
    assert len(sets.train) == 2 and len(sets.val) == 1
    assert set(sets.train[1][1].unique().tolist()) <= {7, IGNORE_INDEX}  # SBD's mask, cropped
    with pytest.raises(DataError, match="no SBD data under") as err:
        build_segmentation_sets("voc_aug", tmp_path / "voc", sbd_root=tmp_path, crop_size=8,
                                base_size=8)
    assert "\n" not in str(err.value)


def test_voc_layout_reads_through_torchvision(tmp_path):
    _voc_tree(tmp_path)
    sets = build_segmentation_sets("voc", tmp_path, crop_size=16, base_size=16)
    assert sets.num_classes == 21 and sets.class_names[15] == "person"
    image, mask = sets.val[0]
    assert image.shape == (3, 16, 20) and mask.shape == (16, 20)
    assert set(mask.unique().tolist()) == {15, IGNORE_INDEX}


def test_train_transforms_move_image_and_mask_together():
    """Pixel values encode the class: after random scale, crop and flip they still agree."""
    torch.manual_seed(0)
    # 10 px blocks of one class each: the bilinear image blends only their borders.
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    ids = ids.repeat_interleave(10, 0).repeat_interleave(10, 1)
    image = tv_tensors.Image((ids * 60).to(torch.uint8).expand(3, -1, -1).clone())
    transform = train_transforms(crop_size=48, base_size=40)
    any_padded = False
    for _ in range(8):
        x, y = transform(image, tv_tensors.Mask(ids))
        assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.int64
        raw = x[0] * 0.229 + 0.485  # undo the normalisation of the first channel
        padded = y == IGNORE_INDEX
        any_padded |= bool(padded.any())  # 40 px scaled by 0.5-2x may fall short of 48
        inside = ~padded
        # Nearest-neighbour mask vs bilinear image: compare where the image is not blended.
        exact = torch.isclose(raw * 255 / 60, y.clamp(max=3).float(), atol=0.05)
        assert exact[inside].float().mean() > 0.7
        assert torch.all(raw[padded] * 255 < 1)
    assert any_padded


def test_pad_collate_pads_masks_with_ignore():
    batch = [(torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64)),
             (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.int64))]
    images, masks = pad_collate(batch)
    assert images.shape == (2, 3, 6, 5) and masks.shape == (2, 6, 5)
    assert (masks[0, 4:] == IGNORE_INDEX).all() and (masks[1, :, 3:] == IGNORE_INDEX).all()
    assert (images[0, :, 4:] == 0).all() and (masks[0, :4, :5] == 0).all()


# --- metrics -------------------------------------------------------------------------------

def _reference_iou(preds: np.ndarray, target: np.ndarray, num_classes: int):
    keep = target != IGNORE_INDEX
    cm = np.bincount(num_classes * target[keep] + preds[keep],
                     minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore"):
        iou = tp / union
    return iou, np.nanmean(iou), tp.sum() / cm.sum()


def test_metrics_match_a_confusion_matrix_over_the_dataset():
    generator = torch.Generator().manual_seed(0)
    metrics = SegmentationMetrics(5)
    preds, targets = [], []
    for _ in range(3):
        logits = torch.randn(2, 5, 7, 9, generator=generator)
        target = torch.randint(0, 4, (2, 7, 9), generator=generator)  # class 4 never occurs
        target[:, 0] = IGNORE_INDEX
        pred = logits.argmax(1)
        pred[pred == 4] = 3  # ... in targets or predictions: its IoU is undefined
        metrics.update(pred if len(preds) % 2 else torch.nn.functional.one_hot(
            pred, 5).permute(0, 3, 1, 2).float(), target)  # labels or scores
        preds.append(pred.numpy().ravel())
        targets.append(target.numpy().ravel())
    iou, miou, acc = _reference_iou(np.concatenate(preds), np.concatenate(targets), 5)
    result = metrics.compute()
    assert np.isnan(iou[4]) and torch.isnan(result["iou"][4])
    np.testing.assert_allclose(result["iou"][:4].numpy(), iou[:4], rtol=1e-6)
    assert float(result["miou"]) == pytest.approx(miou, rel=1e-6)
    assert float(result["pixel_acc"]) == pytest.approx(acc, rel=1e-6)
    table = iou_table(result["iou"], ["bg", "a", "b", "c", "d"])
    assert f"| a | {100 * iou[1]:.3g} |" in table and "| d | nan |" in table


# --- task ----------------------------------------------------------------------------------

def test_poly_schedule_and_aux_lr_reach_the_optimizer():
    optim = SegOptimConfig(lr=0.1, power=0.9, warmup_iters=2)
    assert poly_factor(0, optim, 10) == pytest.approx(1 / 3)
    assert poly_factor(5, optim, 10) == pytest.approx(0.5 ** 0.9)
    assert poly_factor(10, optim, 10) == 0.0
    module = Segmenter(fcn("resnet18", 3, aux_loss=True, backbone_args=NARROW), 3, optim)

    class _Trainer:
        estimated_stepping_batches = 10

    module.trainer = _Trainer()  # type: ignore[assignment]
    config = module.configure_optimizers()
    groups = config["optimizer"].param_groups
    assert [g["initial_lr"] for g in groups] == pytest.approx([0.1, 1.0])
    aux = {id(p) for p in module.model.aux_classifier.parameters()}
    assert {id(p) for p in groups[1]["params"]} == aux
    assert not aux & {id(p) for p in groups[0]["params"]}
    assert config["optimizer"].defaults["weight_decay"] == optim.weight_decay


def test_config_refuses_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.crop' .*data\.crop_size"):
        apply(SegmentationConfig(), {"data": {"crop": 3}})
    with pytest.raises(ConfigError, match=r"data\.batch_size must be an integer"):
        apply(SegmentationConfig(), {"data": {"batch_size": "x"}})
    with pytest.raises(ConfigError, match=r"head must be one of deeplabv3, fcn"):
        apply(SegmentationConfig(), {"head": "pspnet"})
    cfg = apply(SegmentationConfig(), {"optim": {"lr": 1}, "model_args": {"aux_loss": True}},
                merge_mappings=True)
    assert cfg.optim.lr == 1.0 and cfg.model_args["aux_loss"] is True
    assert cfg.model_args["backbone_args"] == {"channels": [16, 32, 64, 128]}


def test_options_reach_the_data_and_the_model(shapes):
    root, _ = shapes
    cfg = apply(SegmentationConfig(), {"head": "fcn", "model": "resnet18_aw",
                              "model_args": {"aux_loss": True,
                                             "replace_stride_with_dilation": [False] * 3,
                                             "backbone_args": NARROW},
                              "data": {"root": str(root), "crop_size": 40, "base_size": 44,
                                       "eval_size": 24}})
    from attnconv.segmentation.run import build_sets

    sets = build_sets(cfg, root)
    assert sets.train[0][0].shape == (3, 40, 40) and sets.train[0][1].shape == (40, 40)
    assert sets.val[0][0].shape == (3, 24, 24)  # the generated 48 px images, resized
    model = build_model(cfg, sets.num_classes)
    assert isinstance(model.classifier, FCNHead) and isinstance(model.aux_classifier, FCNHead)
    assert isinstance(model.backbone["layer1"][0].conv1, AWConv2d)
    assert model.backbone["layer4"][0].conv1.stride == (2, 2)  # no dilation asked for
    assert model.classifier[-1].out_channels == 4


def test_recipe_builds_the_papers_network():
    """The VOC recipe: DeepLabV3 at output stride 16 over resnet101_aw; over the plain ResNet-101
    it is exactly torchvision's deeplabv3_resnet101 (same parameter count)."""
    cfg = load_recipe("deeplabv3_voc_aug", SegmentationConfig)
    assert (cfg.model, cfg.head, cfg.data.name, cfg.data.crop_size) == \
        ("resnet101_aw", "deeplabv3", "voc_aug", 513)
    assert (cfg.optim.lr, cfg.optim.power, cfg.trainer.max_epochs) == (0.007, 0.9, 46)
    assert cfg.data.batch_size * int(cfg.trainer.devices) == 16
    assert cfg.model_args["replace_stride_with_dilation"] == [False, False, True]
    model = build_model(cfg, 21)
    assert isinstance(model.classifier, DeepLabHead) and model.aux_classifier is None
    convs = [m for n, m in model.backbone.named_modules()
             if n.startswith("layer") and n.count(".") == 2 and n.endswith("conv2")]
    assert all(isinstance(c, AWConv2d) for c in convs) and len(convs) == 3 + 4 + 23 + 3
    assert model.backbone["layer4"][1].conv2.dilation == (2, 2)
    plain = build_model(apply(cfg, {"model": "resnet101"}), 21)
    reference = torchvision.models.segmentation.deeplabv3_resnet101(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=False)
    assert count_params(plain) == count_params(reference)
    assert count_params(model) > count_params(plain)


# --- commands ------------------------------------------------------------------------------

def test_train_seg_and_eval_seg_from_the_command_line(tmp_path, capsys, one_thread):
    args = ["--out_dir", str(tmp_path), "--name", "r", "--model", "resnet18_rfa",
            "--head", "fcn", "--model_args", "{dilated_convs: plain, aux_loss: true}",
            "--data.num_train", "4", "--data.num_val", "2", "--data.image_size", "32",
            "--data.base_size", "32", "--data.crop_size", "32", "--data.batch_size", "2",
            "--trainer.max_epochs", "1", "--trainer.progress_bar", "false"]
    main(["train-seg", *args])
    out = capsys.readouterr().out
    assert "fcn_resnet18_rfa: mean IoU" in out and "| triangle |" in out
    folder = tmp_path / "r" / "checkpoints"
    # The figures say which epoch and file they are from.
    assert (f"figures of epoch 1/1 (the last), {folder / 'last.ckpt'}; it is also the best "
            f"epoch ({folder / 'best.ckpt'})") in out
    report = json.loads((tmp_path / "r" / "seg_metrics.json").read_text())
    assert set(report["iou"]) == {"background", "rectangle", "ellipse", "triangle"}
    checkpoint = tmp_path / "r" / "checkpoints" / "best.ckpt"
    result = evaluate(checkpoint, accelerator="cpu")
    assert result.miou == pytest.approx(report["miou"], abs=1e-6)
    assert isinstance(result.iou, dict) and result.model == "resnet18_rfa"
    main(["eval-seg", str(checkpoint), "--accelerator", "cpu"])
    out = capsys.readouterr().out
    assert f"mean IoU {100 * report['miou']:.2f}%" in out
    assert f"figures of {checkpoint} (epoch 1/1)" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["train-seg", "--data.name", "voc", "--data.root", "/nonexistent/voc"],
     "no VOC2012 segmentation data under /nonexistent/voc"),
    (["train-seg", "--data.crop", "3"], "unrecognized arguments: --data.crop 3"),
    (["train-seg", "--data.name", "vocc"], "data.name must be one of shapes, voc, voc_aug"),
    (["train-seg", "--model", "resnet18_rfx"], "resnet18_rfx"),
    (["train-seg", "--model_args", "{replace_stride_with_dilation: [true, true, true]}"],
     "replace_stride_with_dilation must be one of"),
    (["eval-seg", "/nonexistent.ckpt"], "checkpoint /nonexistent.ckpt does not exist"),
])
def test_command_refusals_are_one_line_with_status_2(argv, message, tmp_path, capsys):
    """Abbreviations are refused too: --data.crop never means --data.crop_size."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out_dir", str(tmp_path)] if argv[0] == "train-seg" else argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines()
             if not line.startswith("usage:")]  # argparse's own refusals show the usage
    assert len(lines) == 1 and message in lines[0]


def test_eval_seg_refuses_another_kind_of_checkpoint(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-seg", str(tmp_path / "other.ckpt")])
    assert exit_info.value.code == 2
    assert "is not a checkpoint written by `attnconv train-seg`" in capsys.readouterr().err


def test_help_does_not_import_lightning():
    import subprocess
    import sys

    code = ("import sys\nfrom attnconv.cli import main\n"
            "for cmd in (['train-seg'], ['eval-seg']):\n"
            "    try:\n        main([*cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'torchmetrics', 'matplotlib')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--data.crop_size" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"
