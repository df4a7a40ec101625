"""Starting attention networks from plain pretrained weights (attnconv.pretrained): the weights a
test creates stand in for torchvision's and timm's caches, so nothing downloads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import official_rfa_resnet18_state_dict

from attnconv import create_model
from attnconv.layers import RFAConv2d
from attnconv.pretrained import InitError, attention_keys, init_from


def _randomised_resnet(name: str = "resnet18", num_classes: int = 1000) -> torch.nn.Module:
    """A torchvision ResNet with random BN statistics too, so a missed tensor shows."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return model.eval()


@pytest.fixture
def torchvision_cache(tmp_path, monkeypatch) -> torch.nn.Module:
    """torchvision's resnet18 IMAGENET1K_V1 cache entry, filled with a random ResNet-18."""
    plain = _randomised_resnet()
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(plain.state_dict(), hub / "checkpoints" / Path(url).name)
    return plain


def test_aw_network_from_torchvision_cache_computes_the_plain_network(torchvision_cache) -> None:
    model = create_model("resnet18_aw").eval()
    report = init_from(model, "torchvision:resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torchvision_cache(x), rtol=0, atol=1e-5)
    assert len(report.loaded) == len(torchvision_cache.state_dict())
    assert report.new and all(".conv1." in k for k in report.new)  # AW's pointconvs only
    assert report.skipped == [] and report.classifier_reset == ""
    assert str(report).startswith("init from torchvision:resnet18: 122 tensors loaded")


def test_rfa_weights_are_the_pretrained_kernels_and_classifier_is_reset(torchvision_cache) -> None:
    model = create_model("resnet18_rfa", num_classes=10)
    fc_before = model.fc.weight.clone()
    report = init_from(model, "torchvision:resnet18.IMAGENET1K_V1")
    plain = torchvision_cache.state_dict()
    rfa_layers = {n: m for n, m in model.named_modules() if isinstance(m, RFAConv2d)}
    assert len(rfa_layers) == 8
    for name, layer in rfa_layers.items():
        assert torch.equal(layer.weight, plain[f"{name}.weight"])
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))  # the plain conv had none
        assert f"{name}.bias" in report.new
    assert torch.equal(model.layer1[0].bn1.running_var, plain["layer1.0.bn1.running_var"])
    assert torch.equal(model.fc.weight, fc_before)
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    assert "1000 classes in the weights, 10 here" in str(report)


def test_local_file_of_another_network_is_refused_naming_keys(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in
                               _randomised_resnet().state_dict().items()}}, path)
    with pytest.raises(InitError, match=r"does not fit.*missing: layer1\.2\.conv1\.weight"):
        init_from(create_model("resnet34_aw"), str(path))
    with pytest.raises(InitError, match=r"other shape: layer1\.0\.conv1\.weight") as info:
        init_from(create_model("resnet18_aw", channels=(16, 32, 64, 128)), str(path))
    # A tensor of another width is not also "missing" (it was listed under both).
    assert "layer1.0.conv1.weight" not in str(info.value).split("other shape")[0]


def test_unreadable_sources_are_one_line_errors(tmp_path, monkeypatch) -> None:
    model = create_model("resnet18")
    with pytest.raises(InitError, match="neither torchvision:NAME"):
        init_from(model, str(tmp_path / "nope.pth"))
    with pytest.raises(InitError, match="torchvision has no weights 'IMAGENET9K'"):
        init_from(model, "torchvision:resnet18.IMAGENET9K")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty"))
    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(InitError, match=r"not in the cache .* could not be downloaded"):
        init_from(model, "torchvision:resnet18")


def test_official_rfa_imagenet_checkpoint_starts_the_zoo_model(tmp_path) -> None:
    official = official_rfa_resnet18_state_dict()
    path = tmp_path / "RFAresnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}}, path)
    model = create_model("resnet18_rfa", num_classes=5)
    report = init_from(model, str(path))
    layer = model.layer2[0].conv1
    assert torch.equal(layer.weight, official["layer2.0.conv1.conv.0.weight"])
    assert torch.equal(layer.feature_conv.weight,
                       official["layer2.0.conv1.generate_feature.0.weight"])
    assert report.new == [] and "classifier re-initialised" in str(report)


def test_attention_keys_cover_se_and_aw_but_not_plain_tensors() -> None:
    attention, biases = attention_keys(create_model("resnet50_se_aw"))
    assert "layer1.0.se.fc1.weight" in attention
    assert any(k.startswith("layer1.0.conv2.") and k != "layer1.0.conv2.weight"
               for k in attention)
    assert "layer1.0.conv2.weight" not in attention and "fc.weight" not in attention
    assert biases == set()


@pytest.mark.slow
def test_timm_weights_come_from_the_hugging_face_cache_offline(tmp_path) -> None:
    """A fake Hugging Face cache entry for timm's resnet18.a1_in1k, read in a fresh process
    (the hub reads HF_HOME / HF_HUB_OFFLINE when imported)."""
    from safetensors.torch import save_file

    plain = _randomised_resnet()
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(plain.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    expected = tmp_path / "expected.pt"
    torch.save(plain(torch.ones(1, 3, 32, 32)).detach(), expected)
    script = (
        "import torch\nfrom attnconv import create_model\n"
        "from attnconv.pretrained import init_from\n"
        "m = create_model('resnet18_aw').eval(); r = init_from(m, 'timm:resnet18.a1_in1k')\n"
        f"out = m(torch.ones(1, 3, 32, 32)); ref = torch.load({str(expected)!r})\n"
        "print(r); print('max diff', float((out - ref).abs().max()))\n")
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "init from timm:resnet18.a1_in1k: 122 tensors loaded" in result.stdout
    assert float(result.stdout.split("max diff")[1]) < 1e-5


FINETUNE = {"finetune_imagenet_resnet50_aw": ("resnet50_aw", 1000),
            "finetune_imagenet_resnet101_aw": ("resnet101_aw", 1000),
            "finetune_imagenet_resnet18_rfa": ("resnet18_rfa", 1000),
            "finetune_cifar10": ("resnet18_rfa", 10),
            "finetune_cifar100": ("resnet18_rfa", 100)}


@pytest.mark.parametrize("recipe", sorted(FINETUNE))
def test_finetune_recipes_build_the_papers_network_that_their_weights_fit(recipe: str) -> None:
    """Built and looked at, never downloaded: the network is the paper's (7x7 ImageNet stem,
    full width) and its plain tensors are exactly as many as the recipe's torchvision weights
    hold (torchvision's own count, ``meta['num_params']``)."""
    from torchvision.models import get_model_weights

    from attnconv.analysis.profiling import count_params
    from attnconv.classification.config import ClassificationConfig
    from attnconv.classification.models import build_model
    from attnconv.engine.config import load_recipe

    cfg = load_recipe(recipe, ClassificationConfig)
    name, classes = FINETUNE[recipe]
    assert cfg.model == name
    model = build_model(cfg.model, 1000, 3, **cfg.model_args)
    assert model.conv1.kernel_size == (7, 7) and model.num_features == (
        512 if "18" in name else 2048)
    assert count_params(model) == count_params(create_model(name, num_classes=1000))
    if name == "resnet18_rfa":
        assert round(count_params(model) / 1e6, 2) == 11.85  # RFAConv paper, Table 1
    kind, _, weights_name = cfg.init.partition(":")
    plain, _, member = weights_name.partition(".")
    assert kind == "torchvision" and name.startswith(plain)
    weights = get_model_weights(plain)[member]
    attention, biases = attention_keys(model)
    plain_params = sum(p.numel() for k, p in model.named_parameters()
                       if k not in attention and k not in biases)
    assert plain_params == weights.meta["num_params"]
    assert len(weights.meta["categories"]) == 1000
    if cfg.data.name.startswith("cifar"):
        assert cfg.data.image_size == 224 and cfg.data.name == f"cifar{classes}"


@pytest.mark.slow
def test_train_from_a_finetune_recipe_starts_from_the_cached_torchvision_weights(
        torchvision_cache, tmp_path, capsys) -> None:
    """`attnconv train --config finetune_imagenet_resnet18_rfa --init ...` offline, from the
    (fake) torchvision cache: the run prints the report, and with lr 0 its checkpoint holds the
    pretrained kernels."""
    import numpy as np
    from PIL import Image

    from attnconv.cli import main
    from attnconv.weights import read_state_dict

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / label / f"{i}.png")
    main(["train", "--config", "finetune_imagenet_resnet18_rfa",
          "--init", "torchvision:resnet18",
          "--data.root", str(tmp_path / "data"), "--data.image_size", "32",
          "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.devices", "1",
          "--trainer.accelerator", "cpu", "--trainer.precision", "32",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.progress_bar", "false", "--optim.lr", "0", "--optim.weight_decay", "0",
          "--out_dir", str(tmp_path / "runs"), "--name", "ft"])
    out = capsys.readouterr().out
    assert ("init from torchvision:resnet18: 120 tensors loaded, 64 new attention tensors, "
            "2 skipped (classifier re-initialised: 1000 classes in the weights, 2 here)") in out
    saved = read_state_dict(tmp_path / "runs" / "ft" / "checkpoints" / "last.ckpt")
    plain = torchvision_cache.state_dict()
    assert torch.equal(saved["layer2.0.conv1.weight"], plain["layer2.0.conv1.weight"])
    assert torch.equal(saved["layer2.0.conv2.weight"], plain["layer2.0.conv2.weight"])


def test_init_from_a_classification_run_checkpoint_and_detection_backbone(tmp_path) -> None:
    """A train checkpoint (Lightning's, ``model.`` prefix) starts a network, and the detection
    backbone reads the same sources through ``fasterrcnn(pretrained_backbone=...)``."""
    from attnconv.models.detection import fasterrcnn

    trained = create_model("resnet18_aw", channels=(8, 8, 16, 16), num_classes=3)
    path = tmp_path / "best.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in
                                           trained.state_dict().items()}}, path)
    fresh = create_model("resnet18_aw", channels=(8, 8, 16, 16), num_classes=3)
    report = init_from(fresh, str(path))
    assert report.new == [] and report.skipped == []
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    detector = fasterrcnn("resnet18_aw", num_classes=4, pretrained_backbone=path,
                          backbone_args=dict(channels=(8, 8, 16, 16)), min_size=64,
                          max_size=64)
    body = detector.backbone.body
    assert torch.equal(body.layer3[0].conv1.weight, trained.layer3[0].conv1.weight)
    assert sorted(detector.backbone.load_report.skipped) == ["fc.bias", "fc.weight"]


def test_detection_init_reaches_the_backbone_and_pretrained_backbone_points_to_it(tmp_path
                                                                                  ) -> None:
    from attnconv.detection.config import DetectionConfig
    from attnconv.detection.run import build_detector
    from attnconv.engine.config import ConfigError, apply

    plain = create_model("resnet18", channels=(8, 8, 16, 16), num_classes=0)
    path = tmp_path / "plain.pth"
    torch.save(plain.state_dict(), path)
    cfg = apply(DetectionConfig(), {"init": str(path), "model": "resnet18_rfa",
                              "model_args": {"backbone_args": {"channels": [8, 8, 16, 16]}}},
                merge_mappings=True)
    detector = build_detector(cfg, 3)
    body = detector.backbone.body
    assert torch.equal(body.layer4[1].conv1.weight, plain.layer4[1].conv1.weight)
    assert body.layer4[1].conv2.weight.requires_grad  # trainable_layers 3 with weights
    assert not body.layer1[0].conv2.weight.requires_grad
    bad = apply(DetectionConfig(), {"model_args": {"pretrained_backbone": str(path)}},
                merge_mappings=True)
    with pytest.raises(ConfigError, match="give the backbone's weights as init"):
        build_detector(bad, 3)


def test_pretrained_true_says_which_weights_exist() -> None:
    import timm

    with pytest.raises(ValueError, match=r"no pretrained weights are published for resnet18_rfa"
                                         r".*init_from\(model, 'torchvision:resnet18'\)"):
        timm.create_model("resnet18_rfa", pretrained=True)
    with pytest.raises(ValueError, match="--init torchvision:resnet101"):
        create_model("resnet101_se_aw", pretrained=True)
