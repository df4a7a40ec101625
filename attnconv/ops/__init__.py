"""Fused C++ operators (built on first use) and their eager reference formulations."""

from attnconv.ops.rfa import fused_available, rfa_eager, rfa_feature_stats, rfa_fused

__all__ = ["fused_available", "rfa_eager", "rfa_feature_stats", "rfa_fused"]
