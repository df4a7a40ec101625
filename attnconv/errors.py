"""Errors that modules on both sides of an import raise, in a module that imports nothing, so
raising one never draws an import circle (the recipes raise the config system's error, and the
config system reads the recipes; every task reads checkpoints and images)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError"]


class ConfigError(ValueError):
    """A recipe or an option that cannot describe a run (unknown key, wrong type or value)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (wrong kind, wrong model, refused)."""


class DataError(ValueError):
    """Data that is missing, empty or unreadable, found before training starts."""
