"""The activation-attention baselines against written-out float64 formulas of their papers,
the attention-then-conv baselines, and the string factories."""

from __future__ import annotations

import math

import helpers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnconv import (
    ATTN_LAYERS,
    CAM,
    CBAM,
    CONV_LAYERS,
    ECA,
    SE,
    AttnConv2d,
    CoordAttention,
    create_attn,
    create_conv,
    get_attn,
)
from attnconv.layers import is_attention_conv

pytestmark = pytest.mark.usefixtures("float64_by_default")


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    return helpers.randomise(module, seed).eval()


def mlp(v: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b1=None, b2=None) -> torch.Tensor:
    """v (N, C) -> W2 relu(W1 v + b1) + b2, weights as (out, in) matrices."""
    hidden = v @ w1.flatten(1).T + (0 if b1 is None else b1)
    return torch.relu(hidden) @ w2.flatten(1).T + (0 if b2 is None else b2)


def bn_eval(v: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return ((v - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


X = torch.randn(2, 32, 6, 5, dtype=torch.float64)


def test_se_is_hu_et_al():
    layer = randomise(SE(32))
    assert layer.fc1.out_channels == 2  # C / 16, not rounded to a multiple of 8
    s = torch.sigmoid(mlp(X.mean((2, 3)), layer.fc1.weight, layer.fc2.weight, layer.fc1.bias,
                          layer.fc2.bias))
    torch.testing.assert_close(layer(X), X * s[:, :, None, None])


def channel_attention(layer, x):
    w1, w2 = layer.fc1.weight, layer.fc2.weight
    s = torch.sigmoid(mlp(x.mean((2, 3)), w1, w2) + mlp(x.amax((2, 3)), w1, w2))
    return x * s[:, :, None, None]


def test_cam_is_cbam_channel_attention():
    layer = randomise(CAM(32))
    assert layer.fc1.out_channels == 2 and layer.fc1.bias is None
    torch.testing.assert_close(layer(X), channel_attention(layer, X))


def test_cbam_is_woo_et_al():
    layer = randomise(CBAM(32))
    y = channel_attention(layer.channel, X)
    conv = layer.spatial.conv
    assert conv.conv.kernel_size == (7, 7)
    pooled = torch.stack([y.mean(1), y.amax(1)], dim=1)
    s = torch.sigmoid(bn_eval(F.conv2d(pooled, conv.conv.weight, padding=3), conv.bn))
    torch.testing.assert_close(layer(X), y * s)


def test_coordinate_attention_is_hou_et_al():
    layer = randomise(CoordAttention(32))
    mip = max(8, 32 // 32)
    assert layer.conv1.out_channels == mip and layer.conv1.bias is not None
    h = X.shape[2]
    pooled = torch.cat([X.mean(3), X.mean(2)], dim=2)  # (N, C, H + W)
    y = torch.einsum("mc,ncp->nmp", layer.conv1.weight.flatten(1), pooled)
    y = bn_eval((y + layer.conv1.bias[:, None]).unsqueeze(-1), layer.bn1).squeeze(-1)
    y = y * torch.clamp(y + 3, 0, 6) / 6  # h_swish
    a_h = torch.sigmoid(torch.einsum("cm,nmp->ncp", layer.conv_h.weight.flatten(1), y[..., :h])
                        + layer.conv_h.bias[:, None])
    a_w = torch.sigmoid(torch.einsum("cm,nmp->ncp", layer.conv_w.weight.flatten(1), y[..., h:])
                        + layer.conv_w.bias[:, None])
    torch.testing.assert_close(layer(X), X * a_h[:, :, :, None] * a_w[:, :, None, :])


@pytest.mark.parametrize(("channels", "kernel"), [(32, 3), (64, 3), (256, 5), (512, 5)])
def test_eca_is_wang_et_al(channels, kernel):
    t = int(abs(math.log2(channels) / 2 + 1 / 2))
    assert (t if t % 2 else t + 1) == kernel  # the paper's |log2(C)/gamma + b/gamma|_odd
    layer = randomise(ECA(channels))
    assert layer.conv.kernel_size == (kernel,) and layer.conv.bias is None
    x = torch.randn(2, channels, 3, 4)
    v = x.mean((2, 3))
    padded = F.pad(v, (kernel // 2, kernel // 2))
    w = layer.conv.weight.flatten()
    mixed = sum(w[i] * padded[:, i: i + channels] for i in range(kernel))
    torch.testing.assert_close(layer(x), x * torch.sigmoid(mixed)[:, :, None, None])


@pytest.mark.parametrize(("name", "attn"), [("camconv", CAM), ("cbamconv", CBAM),
                                            ("caconv", CoordAttention)])
def test_attention_then_conv(name, attn):
    layer = randomise(create_conv(name, 32, 8, 3, stride=2, padding=1))
    assert isinstance(layer, AttnConv2d) and isinstance(layer.attn, attn)
    assert layer.weight.shape == (8, 32, 3, 3)
    expected = F.conv2d(layer.attn(X), layer.weight, layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(X), expected)
    with pytest.raises(ValueError, match=r"AttnConv2d\(32, 8.*expected input of shape"):
        layer(torch.randn(2, 16, 5, 5))


def test_attn_conv_is_an_attention_conv_that_refuses_integer_input():
    layer = create_conv("camconv", 8, 4, 3)
    assert is_attention_conv(layer) and not is_attention_conv(layer.attn)
    with pytest.raises(TypeError, match=r"AttnConv2d\(8, 4.*expected a floating-point input"):
        layer(torch.ones(1, 8, 5, 5, dtype=torch.int64))


def test_attn_conv_takes_a_callable_and_rejects_bad_conv_args():
    layer = AttnConv2d(8, 8, 3, padding=1, attn_layer=SE)
    assert isinstance(layer.attn, SE) and "attn_layer='SE'" in repr(layer)
    with pytest.raises(ValueError, match=r"AttnConv2d: .*groups"):
        AttnConv2d(8, 8, 3, groups=3)


def test_factories_build_every_registered_name_and_list_close_matches():
    x = torch.randn(2, 16, 7, 7)
    for name in ATTN_LAYERS:
        assert get_attn(name)(16)(x).shape == x.shape  # timm's attn_layer(channels) slot
        assert create_attn(name, 16, device="cpu", dtype=torch.float64)(x).shape == x.shape
    for name in CONV_LAYERS:
        assert create_conv(name, 16, 4, 3, stride=2, padding=1)(x).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"unknown attention layer 'cbma'.*did you mean 'cbam'"):
        create_attn("cbma", 16)
    with pytest.raises(ValueError, match=r"unknown conv layer 'rfcb'.*did you mean 'rfcbam'"):
        create_conv("rfcb", 16, 16, 3)


def test_timm_resnet_block_takes_get_attn():
    from timm.models.resnet import BasicBlock

    block = BasicBlock(16, 16, attn_layer=get_attn("eca"))
    assert isinstance(block.se, ECA)
    assert block(torch.randn(1, 16, 8, 8)).shape == (1, 16, 8, 8)
