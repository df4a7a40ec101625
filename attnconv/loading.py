"""Networks back from files: :func:`load_model` for export, visualisation and evaluation.

Next to :mod:`attnconv.weights` (which reads the files weights-only) and free of Lightning, so
``attnconv export`` and ``attnconv viz`` do not import the training wing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnconv.weights import read_state_dict, safe_load

__all__ = ["CheckpointError", "Trained", "is_trained_checkpoint", "load_model", "load_trained"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (wrong kind, wrong model, refused)."""


@dataclass
class Trained:
    """A network restored from an ``attnconv train`` checkpoint, with its run's settings."""
    model: torch.nn.Module
    config: Any  # attnconv.training.config.RunConfig
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
    from attnconv.training.config import RunConfig, apply
    from attnconv.training.models import build_model

    state = _read(checkpoint) if state is None else state
    if not is_trained_checkpoint(state):
        raise CheckpointError(f"{checkpoint} is not a checkpoint written by `attnconv train`")
    meta = state["attnconv"]
    if "in_chans" not in meta:  # train-det stores no input channels: a detector, not a classifier
        raise CheckpointError(f"{checkpoint} is a detection checkpoint of `attnconv train-det`, "
                              "not a classifier of `attnconv train` (eval-det evaluates it)")
    cfg = apply(RunConfig(), meta["config"], where=str(checkpoint))
    model = build_model(cfg.model, meta["num_classes"], meta["in_chans"], **cfg.model_args)
    # Classifier keeps the network as `model`: its state-dict keys are `model.<name>`.
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                           if k.startswith("model.")})
    return Trained(model, cfg, meta)


def load_model(name: str, checkpoint: str | Path | None = None, **kwargs: Any
               ) -> tuple[torch.nn.Module, tuple[int, int, int] | None]:
    """The zoo network ``name`` with the weights of ``checkpoint``, and its input size when the
    checkpoint says it.

    ``checkpoint`` may be an ``attnconv train`` checkpoint (its run's model and head are
    rebuilt; ``name`` must match) or a plain state dict (``{'state_dict': ...}`` accepted),
    loaded strictly into ``create_model(name, **kwargs)``. Files are read weights-only.
    """
    from attnconv.training.models import build_model

    if checkpoint is None:
        return build_model(name, **kwargs), None
    state = _read(checkpoint)
    if is_trained_checkpoint(state):
        trained = load_trained(checkpoint, state)
        if trained.config.model != name:
            raise CheckpointError(f"{checkpoint} holds a {trained.config.model!r}, not {name!r}")
        return trained.model, trained.input_size
    model = build_model(name, **kwargs)
    try:
        model.load_state_dict(read_state_dict(state))
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint} does not fit {name!r}: "
                              f"{' '.join(str(err).split())[:400]}") from err
    return model, None
