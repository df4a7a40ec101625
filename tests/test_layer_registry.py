"""A new attention conv is one file with an AttentionConv2d subclass plus one line in
CONV_LAYERS: the factory, conversion, the zoo, pretrained starts, profiling and the figures'
listing then take it with no other edit. Shown with a toy layer registered for the test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnconv import convert_model, create_conv, create_model
from attnconv.analysis.figures import visualize
from attnconv.analysis.profiling import attention_layers
from attnconv.layers import CONV_LAYERS, AttentionConv2d, is_attention_conv
from attnconv.pretrained import init_from

SMALL = dict(cifar_stem=True, channels=(8, 8, 16, 16), num_classes=5)


class ToyConv2d(AttentionConv2d):
    """``conv(x) * (1 + gate(avgpool(x)))``: a per-sample, per-output-channel gain that starts
    at one, so a fresh layer is the plain conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", device=None,
                 dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.gate = nn.Conv2d(in_channels, out_channels, 1, device=device, dtype=dtype)
        self.reset_attention()

    def reset_attention(self) -> None:
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return super().forward(x) * (1 + self.gate(F.adaptive_avg_pool2d(x, 1)))


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(CONV_LAYERS, "toy", ToyConv2d)
    return "toy"


def test_the_factory_builds_the_registered_layer(toy):
    layer = create_conv(toy, 4, 6, 3, stride=2, padding=1)
    assert isinstance(layer, ToyConv2d) and is_attention_conv(layer)
    assert layer(torch.randn(2, 4, 8, 8)).shape == (2, 6, 4, 4)
    with pytest.raises(TypeError, match=r"ToyConv2d\(4, 6.*floating-point input"):
        layer(torch.ones(2, 4, 8, 8, dtype=torch.int64))


def test_conversion_replaces_convs_and_leaves_the_layers_own_convs_alone(toy):
    torch.manual_seed(0)
    plain = create_model("resnet18", **SMALL).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = plain(x)
    model, report = convert_model(plain, toy)
    replaced = [m for m in model.modules() if isinstance(m, ToyConv2d)]
    assert len(report.replaced) == len(replaced) == 16
    with torch.no_grad():  # the gain starts at one: the converted network computes the same
        torch.testing.assert_close(model(x), expected)
    # Converting again: the toy layers, and the convs inside them, are not plain convs to take.
    _, again = convert_model(model, "conv", where=lambda name, conv: True)
    assert not any(name.endswith(".gate") for name in again.replaced + list(again.skipped))


def test_the_zoo_builds_it_and_restores_its_start_after_timms_init(toy):
    model = create_model("resnet18", conv_layer=toy, **SMALL)
    layers = [model.get_submodule(name) for name in model.block_conv_names()]
    assert all(isinstance(layer, ToyConv2d) for layer in layers)
    # timm kaiming-initialises every nn.Conv2d, the gate too; the layer's reset undoes that.
    assert all(not layer.gate.weight.any() for layer in layers)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)


def test_a_pretrained_start_leaves_its_attention_new(toy):
    plain = create_model("resnet18", **SMALL)
    model = create_model("resnet18", conv_layer=toy, **SMALL)
    report = init_from(model, plain.state_dict())
    assert report.new and all(".gate." in key for key in report.new)
    assert not any(key.endswith("conv1.weight") for key in report.new)


def test_profiling_and_the_figures_list_it(toy, tmp_path):
    model = create_model("resnet18", conv_layer=toy, **SMALL)
    assert attention_layers(model) == [("ToyConv2d", 8, "conv1 in layer1-4")]
    with pytest.raises(ValueError, match=r"attention layers: \['layer1.0.conv1', "):
        visualize(model, tmp_path, size=16, layer="layer9")
    # listed, but no figure draws it: said, not an empty result
    with pytest.raises(ValueError, match="no AW, RFA-family or activation-attention layer"):
        visualize(model, tmp_path, size=16)


def _registered_attention_convs() -> list[str]:
    return [name for name in CONV_LAYERS if is_attention_conv(create_conv(name, 4, 4, 3))]


@pytest.mark.parametrize("name", _registered_attention_convs())
def test_the_zoo_resets_every_attention_conv_after_its_init(name, monkeypatch):
    cls = type(create_conv(name, 4, 4, 3))
    reset = []
    monkeypatch.setattr(cls, "reset_attention", lambda self: reset.append(self))
    model = create_model("resnet18", conv_layer=name, **SMALL)
    layers = [m for m in model.modules() if is_attention_conv(m)]
    assert len(layers) == 8
    assert all(any(layer is r for r in reset) for layer in layers)
