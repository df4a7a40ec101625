"""The math of the attention convs apart from their modules, as ``torch.nn.functional`` is to
``torch.nn``: :mod:`attnconv.functional.aw` (AW-convolution's three paths and the chunked
path's autograd Function) and :mod:`attnconv.functional.rfa` (the RFA family as functions of
the layers' tensors, on the fused operators or the eager formulation)."""

from attnconv.functional._common import compute_dtype
from attnconv.functional.aw import (
    CPU_BATCH_BYTES,
    CPU_CHUNK_BYTES,
    aw_conv2d,
    aw_conv2d_grouped,
    aw_conv2d_reference,
    aw_conv2d_unfold,
    aw_kernels,
    default_chunk_size,
)
from attnconv.functional.rfa import (
    attended_pointwise_reference,
    bn_relu_reference,
    from_tiles,
    rfa_conv2d,
    rfa_reference,
    rfa_tile_conv2d,
    tap_softmax,
    tile_factors,
    tile_reductions,
    to_tiles,
)

__all__ = [
    "CPU_BATCH_BYTES",
    "CPU_CHUNK_BYTES",
    "attended_pointwise_reference",
    "aw_conv2d",
    "aw_conv2d_grouped",
    "aw_conv2d_reference",
    "aw_conv2d_unfold",
    "aw_kernels",
    "bn_relu_reference",
    "compute_dtype",
    "default_chunk_size",
    "from_tiles",
    "rfa_conv2d",
    "rfa_reference",
    "rfa_tile_conv2d",
    "tap_softmax",
    "tile_factors",
    "tile_reductions",
    "to_tiles",
]
