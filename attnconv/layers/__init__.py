"""Attention convolutions and their factories."""

from attnconv.layers.aw_conv import AWConv2d
from attnconv.layers.create import CONV_LAYERS, create_conv, get_conv

__all__ = ["CONV_LAYERS", "AWConv2d", "create_conv", "get_conv"]
