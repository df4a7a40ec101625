"""attnconv: convolutions whose attention has the shape of the kernel (AW-convolution) or of
its receptive field (RFAConv), with the papers' networks, training, detection and export."""

from attnconv.convert import ConversionReport, convert_model
from attnconv.layers import CONV_LAYERS, AWConv2d, create_conv, get_conv
from attnconv.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "CONV_LAYERS",
    "AWConv2d",
    "ConversionReport",
    "__version__",
    "convert_model",
    "create_conv",
    "create_model",
    "get_conv",
    "list_models",
]
