"""Fused C++ operators of the RFA family (built by ``make``, or on first use); the functions
of :mod:`attnconv.functional.rfa` call them."""

from attnconv.ops.rfa import (
    RFA_IMPLS,
    ensure_loaded,
    fused_available,
    rfa_feature_stats,
    rfa_fused,
)
from attnconv.ops.rfa_tile import rfa_tile_attend, rfa_tile_reduce

__all__ = ["RFA_IMPLS", "ensure_loaded", "fused_available", "rfa_feature_stats", "rfa_fused",
           "rfa_tile_attend", "rfa_tile_reduce"]
