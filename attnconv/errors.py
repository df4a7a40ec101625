"""Errors that modules on both sides of an import raise, in a module that imports nothing, so
raising one never draws an import circle (the recipes raise the config system's error, and the
config system reads the recipes; every task reads checkpoints)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError"]


class ConfigError(ValueError):
    """A recipe or an option that cannot describe a run (unknown key, wrong type or value)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (wrong kind, wrong model, refused)."""
