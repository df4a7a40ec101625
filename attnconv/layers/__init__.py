"""Attention convolutions, activation-attention baselines and their factories."""

from attnconv.layers.attention import CAM, CBAM, ECA, SE, AttnConv2d, CoordAttention
from attnconv.layers.aw_conv import AWConv2d
from attnconv.layers.base import AttentionConv2d, is_attention_conv, set_impl, use_impl
from attnconv.layers.create import (
    ATTN_LAYERS,
    CONV_LAYERS,
    create_attn,
    create_conv,
    get_attn,
    get_conv,
)
from attnconv.layers.rfa_conv import RFAConv2d, RFCAConv2d, RFCBAMConv2d

__all__ = [
    "ATTN_LAYERS",
    "CAM",
    "CBAM",
    "CONV_LAYERS",
    "ECA",
    "SE",
    "AWConv2d",
    "AttentionConv2d",
    "AttnConv2d",
    "CoordAttention",
    "RFAConv2d",
    "RFCAConv2d",
    "RFCBAMConv2d",
    "create_attn",
    "create_conv",
    "get_attn",
    "get_conv",
    "is_attention_conv",
    "set_impl",
    "use_impl",
]
