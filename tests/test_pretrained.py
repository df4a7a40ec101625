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
from test_models import _official_rfa_resnet18_state_dict

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
    with pytest.raises(InitError, match=r"other shape: layer1\.0\.conv1\.weight"):
        init_from(create_model("resnet18_aw", channels=(16, 32, 64, 128)), str(path))


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
    official = _official_rfa_resnet18_state_dict()
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
