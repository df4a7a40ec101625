"""attnconv: convolutions whose attention has the shape of the kernel (AW-convolution) or of
its receptive field (RFAConv), with the papers' networks, training, detection and export."""

from attnconv.layers import CONV_LAYERS, AWConv2d, create_conv, get_conv

__version__ = "0.1.0"

__all__ = ["CONV_LAYERS", "AWConv2d", "__version__", "create_conv", "get_conv"]
