"""Reading and writing weight files safely, in one place for training, the zoo and detection.

Reading never unpickles arbitrary objects (``torch.load(weights_only=True)`` or safetensors), so
a file downloaded from the internet cannot run code. Writing goes to a temporary file in the same
folder that then replaces the target with ``os.replace``: a kill leaves the old file or the new
one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: Wrappers training scripts put around a state dict, and key prefixes they add
#: (DataParallel's ``module.``, a Lightning module's ``model.``).
_WRAPPERS = ("state_dict", "model", "model_state")
_PREFIXES = ("module.", "model.")


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Tensors and plain containers from ``path``; anything else is refused (ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device=str(map_location))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for disallowed globals
        raise ValueError(f"refusing to load {path}: it is not a plain weights/checkpoint file "
                         f"readable with weights_only=True ({type(err).__name__}: {err})") from err


def read_state_dict(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict in ``checkpoint`` (a file, read with :func:`safe_load`, or an already
    loaded mapping), with the usual wrappers and key prefixes removed."""
    state: Any = checkpoint if isinstance(checkpoint, Mapping) else safe_load(checkpoint)
    for wrapper in _WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"{checkpoint if not isinstance(checkpoint, Mapping) else 'checkpoint'} "
                         "holds no state dict")
    cleaned = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
