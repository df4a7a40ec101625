"""Attention pictures: valid PNGs that show the layers' actual attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import SEModule
from torch import nn

from attnconv import AWConv2d
from attnconv.viz import (
    augmented_batch,
    effective_gate,
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
    scale = (1 + layer.attention(batch)).detach().flatten(3)
    for o in range(4):
        np.testing.assert_allclose(figure.panels[f"filter {o}: 1+A mean"],
                                   scale[:, o].mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(figure.panels[f"filter {o}: 1+A std"],
                                   scale[:, o].std(0).numpy(), rtol=1e-5)
    assert figure.panels["filter 0: 1+A std"].max() > 0  # the views differ


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
