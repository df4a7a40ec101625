"""Attention pictures: valid PNGs that show the layers' actual attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import SEModule
from torch import nn

from attnconv import AWConv2d, create_conv, create_model
from attnconv.analysis.figures import (
    augmented_batch,
    effective_gate,
    kernel_mosaic,
    load_image,
    plot_aw_attention,
    plot_gate_maps,
    plot_rfa_attention,
    rfa_tiles,
)


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_default_image_ships_with_a_dependency():
    pixels, tensor = load_image(size=64)
    assert pixels.shape == (64, 64, 3) and pixels.min() >= 0 and pixels.max() <= 1
    assert tensor.shape == (1, 3, 64, 64)
    assert abs(tensor.mean().item()) < 2  # normalised, not raw [0, 255]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image("/nonexistent.png")


def test_aw_figure_shows_the_layers_attention(tmp_path):
    torch.manual_seed(0)
    layer = AWConv2d(3, 6, 3, padding=1)
    nn.init.normal_(layer.pointconv2.weight, std=0.3)
    _, image = load_image(size=32)
    batch = augmented_batch(image, n=4)
    figure = plot_aw_attention(layer, batch, tmp_path / "aw.png", filters=4)
    assert png_size(figure.path) == (880, 440)
    scale = (1 + layer.attention(batch)).detach()
    for o in range(4):
        np.testing.assert_allclose(figure.panels[f"filter {o}: 1+A mean"],
                                   kernel_mosaic(scale[:, o].mean(0)), rtol=1e-6)
        np.testing.assert_allclose(figure.panels[f"filter {o}: 1+A std"],
                                   kernel_mosaic(scale[:, o].std(0)), rtol=1e-5)
    assert np.nanmax(figure.panels["filter 0: 1+A std"]) > 0  # the views differ


def test_rfa_tiles_follow_the_papers_rearrangement():
    attention = torch.rand(1, 2, 9, 4, 5)
    tiles = rfa_tiles(attention)[0]
    mean = attention.mean(1)[0]
    for h, w, i, j in [(0, 0, 0, 0), (3, 4, 2, 2), (1, 2, 0, 1), (2, 3, 2, 0)]:
        assert tiles[h * 3 + i, w * 3 + j] == pytest.approx(mean[i * 3 + j, h, w].item())


def test_rfa_figure(tmp_path):
    attention = torch.softmax(torch.randn(1, 4, 9, 8, 8), dim=2)
    pixels, _ = load_image(size=32)
    figure = plot_rfa_attention(attention, pixels, tmp_path / "rfa.png")
    assert png_size(figure.path) == (800, 400)
    np.testing.assert_allclose(figure.panels["receptive-field attention"],
                               rfa_tiles(attention)[0].numpy(), rtol=1e-6)


def test_effective_gate_of_se_is_its_channel_gate(tmp_path):
    torch.manual_seed(0)
    se = SEModule(8, rd_ratio=1 / 4).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        gate = torch.sigmoid(se.fc2(se.act(se.fc1(x.mean((2, 3), keepdim=True)))))
        gate_map = effective_gate(x, se(x))
    torch.testing.assert_close(gate_map, gate.mean(1).expand(2, 6, 6),
                               rtol=1e-5, atol=1e-6)
    pixels, _ = load_image(size=32)
    figure = plot_gate_maps({"layer1.0.se": gate_map[0]}, pixels, tmp_path / "gates.png")
    assert png_size(figure.path) == (300, 300)
    np.testing.assert_allclose(figure.panels["layer1.0.se"], gate_map[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["rfa", "rfcbam", "rfca"])
def test_receptive_field_attention_is_what_the_layer_applies(name):
    """out == conv_1x1(g * attention) with g = ReLU(BN(dwconv(x))) (eval mode)."""
    torch.manual_seed(0)
    layer = create_conv(name, 4, 5, 3, 2).double()
    layer(torch.randn(4, 4, 9, 9, dtype=torch.float64))  # BN statistics
    layer.eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    attention = layer.receptive_field_attention(x)
    assert attention.shape == (2, 4, 9, 5, 5)
    with torch.no_grad():
        g = torch.relu(layer.feature_bn(layer.feature_conv(x))).view(2, 4, 9, 5, 5)
        expected = torch.nn.functional.conv2d((g * attention).flatten(1, 2),
                                              layer.weight.reshape(5, -1, 1, 1), layer.bias)
        torch.testing.assert_close(layer(x), expected)
    if name == "rfa":
        torch.testing.assert_close(attention.sum(2), torch.ones(2, 4, 5, 5, dtype=torch.float64))


NARROW = dict(num_classes=5, channels=(8, 16, 32, 64))


def test_visualize_a_zoo_model_shows_its_layers_attention(tmp_path):
    from attnconv.analysis.figures import visualize

    torch.manual_seed(0)
    model = create_model("resnet50_se_aw", **NARROW).eval()
    for name, p in model.named_parameters():
        if "pointconv2" in name:
            torch.nn.init.normal_(p, std=0.1)
        if name.endswith("bn3.weight"):  # zero-initialised: the SE modules would see only 0
            torch.nn.init.uniform_(p, 0.5, 1.5)
    inputs = {}
    model.layer1[0].conv2.register_forward_hook(lambda m, a, o: inputs.setdefault("aw", a[0]))
    figures = {f.path.name: f for f in visualize(model, tmp_path, size=32, views=3)}
    assert set(figures) == {"aw_attention.png", "gate_maps.png"}
    for figure in figures.values():
        png_size(figure.path)
    expected = (1 + model.layer1[0].conv2.attention(inputs["aw"])).mean(0)
    np.testing.assert_allclose(figures["aw_attention.png"].panels["filter 0: 1+A mean"],
                               kernel_mosaic(expected[0].detach()), rtol=1e-5)
    gate = figures["gate_maps.png"].panels["SE in layer1.0"]  # what it is, where
    assert np.isfinite(gate).all() and 0 < gate.min() <= gate.max() < 1  # a sigmoid gate


def test_visualize_cli_on_an_rfa_model(tmp_path, capsys):
    from attnconv.cli import main

    main(["viz", "--model", "resnet18_rfcbam", "--size", "32", "--num-classes", "3",
          "--layer", "layer2.0.conv1", "--out", str(tmp_path)])
    assert f"wrote {tmp_path / 'rfa_attention.png'}" in capsys.readouterr().out
    assert png_size(tmp_path / "rfa_attention.png") == (800, 400)
    with pytest.raises(SystemExit) as exit_info:  # a refusal: one line, exit status 2
        main(["viz", "--model", "resnet18_rfcbam", "--layer", "layer9", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "has no module 'layer9'" in capsys.readouterr().err


def test_effective_gate_is_blank_where_the_input_is_zero():
    x = torch.randn(1, 3, 2, 2)
    x[..., 0, 0] = 0
    gate = effective_gate(x, 2 * x)
    assert torch.isnan(gate[0, 0, 0])
    torch.testing.assert_close(gate[0, 1:, :], torch.full((1, 2), 2.0))
