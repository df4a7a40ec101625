"""attnconv: convolutions whose attention has the shape of the kernel (AW-convolution) or of
its receptive field (RFAConv), with the papers' networks, training, detection and export."""

from attnconv.convert import ConversionReport, convert_model
from attnconv.layers import (
    ATTN_LAYERS,
    CAM,
    CBAM,
    CONV_LAYERS,
    ECA,
    SE,
    AttnConv2d,
    AWConv2d,
    CoordAttention,
    RFAConv2d,
    RFCAConv2d,
    RFCBAMConv2d,
    create_attn,
    create_conv,
    get_attn,
    get_conv,
    set_impl,
    use_impl,
)
from attnconv.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "ATTN_LAYERS",
    "CAM",
    "CBAM",
    "CONV_LAYERS",
    "ECA",
    "SE",
    "AWConv2d",
    "AttnConv2d",
    "ConversionReport",
    "CoordAttention",
    "RFAConv2d",
    "RFCAConv2d",
    "RFCBAMConv2d",
    "__version__",
    "convert_model",
    "create_attn",
    "create_conv",
    "create_model",
    "get_attn",
    "get_conv",
    "list_models",
    "set_impl",
    "use_impl",
]
