"""convert_model on torchvision, timm and hand-written networks."""

from __future__ import annotations

import timm
import torch
import torchvision
from timm.layers import Conv2dSame
from torch import nn

from attnconv import AWConv2d, RFAConv2d, convert_model


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics, so an equality test exercises every path."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)


def test_aw_conversion_of_torchvision_resnet_keeps_outputs() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    _randomise_batchnorm(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    kernel = model.layer2[0].conv1.weight.detach().clone()
    model, report = convert_model(model, "aw")
    assert len(report.replaced) == 16  # both 3x3 convs of 8 BasicBlocks
    assert "layer2.0.conv1" in report.replaced
    assert report.skipped["conv1"].startswith("stem")
    downsample = [n for n in report.skipped if "downsample" in n]
    assert len(downsample) == 3
    assert all(report.skipped[n].startswith("1x1") for n in downsample)
    assert len(report.skipped) == 4
    assert isinstance(model.layer2[0].conv1, AWConv2d)
    assert not model.layer2[0].conv1.training
    assert torch.equal(model.layer2[0].conv1.weight, kernel)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert "16 conv(s) replaced by 'aw', 4 skipped" in str(report)


def test_aw_conversion_of_timm_efficientnet_keeps_outputs() -> None:
    # Depthwise 3x3 convs become depthwise AW convs; 5x5 and 1x1 convs stay.
    model = timm.create_model("efficientnet_b0", num_classes=10).eval()
    _randomise_batchnorm(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    model, report = convert_model(model, "aw")
    depthwise = [model.get_submodule(n) for n in report.replaced
                 if model.get_submodule(n).groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert "conv_stem" in report.skipped
    assert any(reason.startswith("5x5 kernel") for reason in report.skipped.values())
    assert len(report.replaced) == sum(
        1 for n, m in timm.create_model("efficientnet_b0").named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv_stem")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_aw_conversion_of_timm_deep_stem_resnet_keeps_outputs() -> None:
    model = timm.create_model("resnet10t", num_classes=10).eval()
    _randomise_batchnorm(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    model, report = convert_model(model, "aw", attn_channels=2)
    # Only the first of the three stem convs sees the image.
    assert "conv1.0" in report.skipped and {"conv1.3", "conv1.6"} <= set(report.replaced)
    assert model.conv1[3].attn_channels == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        Conv2dSame(8, 8, 3, stride=2),
        nn.Conv2d(8, 8, 1),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
    )


def test_where_as_regex_names_and_predicate() -> None:
    _, report = convert_model(_small_net(), "aw", where=r"[124]")
    assert report.replaced == ["1", "4"]
    assert report.skipped["0"] == "not selected by `where`"
    assert report.skipped["2"] == "Conv2dSame is not a plain nn.Conv2d"
    _, report = convert_model(_small_net(), "aw", where=["0", "3"])
    assert report.replaced == ["0", "3"]
    _, report = convert_model(_small_net(), "aw", where=lambda _, m: m.dilation == (2, 2))
    assert report.replaced == ["4"]


def test_default_where_and_bias_kept() -> None:
    net = _small_net()
    bias = net[4].bias.detach().clone()
    net, report = convert_model(net, "aw")
    assert report.replaced == ["1", "4"]
    assert set(report.skipped) == {"0", "2", "3"}
    assert net[1].bias is None
    assert torch.equal(net[4].bias, bias) and net[4].dilation == (2, 2)


def test_converting_twice_leaves_attention_convs_and_their_inner_convs_alone() -> None:
    net, _ = convert_model(_small_net(), "aw")
    net, report = convert_model(net, "aw", where=lambda *_: True)
    assert report.replaced == ["0", "3"]
    assert report.skipped["1"] == "AWConv2d is not a plain nn.Conv2d"
    assert not any("pointconv" in name for name in report.skipped)


def test_conversion_keeps_dtype() -> None:
    net, report = convert_model(_small_net().double(), "aw")
    assert report.replaced == ["1", "4"]
    assert net[1].weight.dtype == net[1].pointconv1.weight.dtype == torch.float64
    assert net(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_rfa_conversion_keeps_the_kernel_and_skips_what_rfa_cannot_express() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    kernel = model.layer3[1].conv2.weight.detach().clone()
    model, report = convert_model(model, "rfa")
    assert len(report.replaced) == 16
    assert isinstance(model.layer3[1].conv2, RFAConv2d)
    assert torch.equal(model.layer3[1].conv2.weight, kernel)
    assert model.layer3[1].conv2.bias is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                        nn.Conv2d(8, 8, 3, padding=1, dilation=2), nn.Conv2d(8, 8, 3),
                        nn.Conv2d(8, 8, 3, padding=1, bias=True))
    net, report = convert_model(net, "rfa")
    assert report.replaced == ["4"]
    assert "groups must be 1" in report.skipped["1"]
    assert "dilation must be 1" in report.skipped["2"]
    assert "padding must be None or kernel_size // 2" in report.skipped["3"]
    assert net[4].bias is not None
