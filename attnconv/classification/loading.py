"""Networks back from files: :func:`load_model` for export, visualisation and evaluation.

The files are read weights-only by :mod:`attnconv.weights`. Free of Lightning, so ``attnconv
export`` and ``attnconv viz`` stay quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnconv.errors import CheckpointError
from attnconv.weights import read_state_dict, safe_load

__all__ = ["CheckpointError", "Trained", "is_trained_checkpoint", "load_model", "load_trained"]


@dataclass
class Trained:
    """A network restored from an ``attnconv train`` checkpoint, with its run's settings."""
    model: torch.nn.Module
    config: Any  # attnconv.classification.config.ClassificationConfig
    meta: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.meta["in_chans"], self.meta["image_size"], self.meta["image_size"])


def is_trained_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and "attnconv" in state and "state_dict" in state


def _read(checkpoint: str | Path) -> Any:
    try:
        return safe_load(checkpoint)
    except ValueError as err:  # refused by the weights-only reader, or not a torch file
        raise CheckpointError(str(err).splitlines()[0]) from err


def load_trained(checkpoint: str | Path, state: dict[str, Any] | None = None) -> Trained:
    """Rebuild the network of an ``attnconv train`` checkpoint (read weights-only, unless its
    already loaded ``state`` is given)."""
    from attnconv.classification.config import ClassificationConfig
    from attnconv.classification.models import build_model
    from attnconv.engine.config import apply

    state = _read(checkpoint) if state is None else state
    if not is_trained_checkpoint(state):
        raise CheckpointError(f"{checkpoint} is not a checkpoint written by `attnconv train`")
    meta = state["attnconv"]
    _check_classifier_meta(meta, checkpoint)
    cfg = apply(ClassificationConfig(), meta["config"], where=str(checkpoint))
    model = build_model(cfg.model, meta["num_classes"], meta["in_chans"], **cfg.model_args)
    # Classifier keeps the network as `model`: its state-dict keys are `model.<name>`.
    _load_weights(model, {k.removeprefix("model."): v for k, v in state["state_dict"].items()
                          if k.startswith("model.")},
                  f"{checkpoint}: its weights do not fit the {cfg.model!r} with "
                  f"{meta['num_classes']} classes its metadata names")
    return Trained(model, cfg, meta)


def _check_classifier_meta(meta: Any, checkpoint: str | Path) -> None:
    """CheckpointError naming the command that wrote ``meta`` when it is not ``attnconv
    train``, or the keys a classifier is rebuilt from that it lacks."""
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{checkpoint} has no run config in its metadata: it was not "
                              "written by `attnconv train`")
    if "class_names" in meta:
        raise CheckpointError(f"{checkpoint} is a segmentation checkpoint of `attnconv "
                              "train-seg`, not a classifier of `attnconv train` (eval-seg "
                              "evaluates it)")
    if "train_annotations" in (config.get("data") or {}):
        raise CheckpointError(f"{checkpoint} is a detection checkpoint of `attnconv train-det`, "
                              "not a classifier of `attnconv train` (eval-det evaluates it)")
    missing = [k for k in ("num_classes", "in_chans", "image_size") if k not in meta]
    if missing:
        raise CheckpointError(f"{checkpoint} is a checkpoint of `attnconv train` without "
                              f"{', '.join(missing)} in its metadata, which rebuilding its "
                              "network needs")


def _load_weights(model: torch.nn.Module, weights: dict[str, Any], context: str) -> None:
    """``model.load_state_dict(weights)`` (strict), CheckpointError with ``context`` and
    torch's reason in one line when they do not fit."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        reason = " ".join(str(err).split()).split(": ", 1)[-1]  # after "Error(s) in ... for X"
        raise CheckpointError(f"{context}: {reason[:300]}") from err


def load_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any
               ) -> tuple[torch.nn.Module, tuple[int, int, int] | None]:
    """The zoo network ``name`` with the weights of ``checkpoint``, and its input size when the
    checkpoint says it.

    ``checkpoint`` may be an ``attnconv train`` checkpoint (its run's model and head are
    rebuilt; ``name`` must match) or a plain state dict (``{'state_dict': ...}`` accepted),
    loaded strictly into ``create_model(name, **kwargs)``. Files are read weights-only.
    """
    from attnconv.classification.models import build_model

    if checkpoint is None:
        return build_model(name, **kwargs), None
    state = _read(checkpoint)
    if is_trained_checkpoint(state):
        trained = load_trained(checkpoint, state)
        if trained.config.model != name:
            raise CheckpointError(f"{checkpoint} holds a {trained.config.model!r}, not {name!r}")
        return trained.model, trained.input_size
    model = build_model(name, **kwargs)
    _load_weights(model, read_state_dict(state), f"{checkpoint} does not fit {name!r}")
    return model, None
