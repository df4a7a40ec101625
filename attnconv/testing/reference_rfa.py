"""Faithful references of the official RFAConv modules (Liuchen1997/RFAConv): same sub-module
layout and state-dict keys, the rearrange to (H'k, W'k) and the stride-k conv. Slow on purpose.
The tests check the layers against them and the benchmarks time the layers against them.

``trailing_bn_relu=True`` gives the ``model.py`` layout (BatchNorm2d + ReLU after the final
conv, keys ``conv.1.*``); the default is the ``classification/RF*resnet.py`` layout.
"""

from __future__ import annotations

import torch
from torch import nn


def rearrange_taps(t: torch.Tensor, k: int) -> torch.Tensor:
    """einops 'b c (n1 n2) h w -> b c (h n1) (w n2)' with n1 = n2 = k."""
    b, c, _, h, w = t.shape
    return t.view(b, c, k, k, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * k, w * k)


def _final_conv(cin: int, cout: int, k: int, trailing_bn_relu: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride=k)]
    if trailing_bn_relu:
        layers += [nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


def _generate(cin: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin * k * k, k, padding=k // 2, stride=stride, groups=cin, bias=False),
        nn.BatchNorm2d(cin * k * k), nn.ReLU())


class OfficialRFAConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size, stride=1, trailing_bn_relu=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.get_weight = nn.Sequential(
            nn.AvgPool2d(kernel_size=kernel_size, padding=kernel_size // 2, stride=stride),
            nn.Conv2d(in_channel, in_channel * kernel_size ** 2, kernel_size=1,
                      groups=in_channel, bias=False))
        self.generate_feature = _generate(in_channel, kernel_size, stride)
        self.conv = _final_conv(in_channel, out_channel, kernel_size, trailing_bn_relu)

    def forward(self, x):
        b, c = x.shape[0:2]
        k = self.kernel_size
        weight = self.get_weight(x)
        h, w = weight.shape[2:]
        weighted = weight.view(b, c, k * k, h, w).softmax(2)
        feature = self.generate_feature(x).view(b, c, k * k, h, w)
        weighted_data = feature * weighted
        return self.conv(rearrange_taps(weighted_data, k))


class _SE(nn.Module):
    def __init__(self, in_channel, ratio=16):
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Sequential(nn.Linear(in_channel, ratio, bias=False), nn.ReLU(),
                                nn.Linear(ratio, in_channel, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[0:2]
        return self.fc(self.gap(x).view(b, c)).view(b, c, 1, 1)


class OfficialRFCBAMConv(nn.Module):
    def __init__(self, in_channel, out_channel, kernel_size=3, stride=1, trailing_bn_relu=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.generate = _generate(in_channel, kernel_size, stride)
        self.get_weight = nn.Sequential(nn.Conv2d(2, 1, kernel_size=3, padding=1, bias=False),
                                        nn.Sigmoid())
        self.se = _SE(in_channel)
        self.conv = _final_conv(in_channel, out_channel, kernel_size, trailing_bn_relu)

    def forward(self, x):
        b, c = x.shape[0:2]
        k = self.kernel_size
        channel_attention = self.se(x)
        generate_feature = self.generate(x)
        h, w = generate_feature.shape[2:]
        generate_feature = rearrange_taps(generate_feature.view(b, c, k * k, h, w), k)
        unfold_feature = generate_feature * channel_attention
        max_feature, _ = torch.max(generate_feature, dim=1, keepdim=True)
        mean_feature = torch.mean(generate_feature, dim=1, keepdim=True)
        receptive_field_attention = self.get_weight(torch.cat((max_feature, mean_feature), dim=1))
        return self.conv(unfold_feature * receptive_field_attention)


class _HSwish(nn.Module):
    def forward(self, x):
        return x * torch.nn.functional.relu6(x + 3) / 6


class OfficialRFCAConv(nn.Module):
    def __init__(self, inp, oup, kernel_size, stride, reduction=32, trailing_bn_relu=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.generate = _generate(inp, kernel_size, stride)
        self.pool_h = nn.AdaptiveAvgPool2d((None, 1))
        self.pool_w = nn.AdaptiveAvgPool2d((1, None))
        mip = max(8, inp // reduction)
        self.conv1 = nn.Conv2d(inp, mip, kernel_size=1, stride=1, padding=0)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = _HSwish()
        self.conv_h = nn.Conv2d(mip, inp, kernel_size=1, stride=1, padding=0)
        self.conv_w = nn.Conv2d(mip, inp, kernel_size=1, stride=1, padding=0)
        self.conv = _final_conv(inp, oup, kernel_size, trailing_bn_relu)

    def forward(self, x):
        b, c = x.shape[0:2]
        k = self.kernel_size
        generate_feature = self.generate(x)
        h, w = generate_feature.shape[2:]
        generate_feature = rearrange_taps(generate_feature.view(b, c, k * k, h, w), k)
        x_h = self.pool_h(generate_feature)
        x_w = self.pool_w(generate_feature).permute(0, 1, 3, 2)
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        h, w = generate_feature.shape[2:]
        x_h, x_w = torch.split(y, [h, w], dim=2)
        x_w = x_w.permute(0, 1, 3, 2)
        a_h = self.conv_h(x_h).sigmoid()
        a_w = self.conv_w(x_w).sigmoid()
        return self.conv(generate_feature * a_w * a_h)
