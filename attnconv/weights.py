"""Reading and writing weight files safely, in one place for training, the zoo and detection.

Reading never unpickles arbitrary objects (``torch.load(weights_only=True)`` or safetensors), so
a file downloaded from the internet cannot run code. Writing goes to a temporary file in the same
folder that then replaces the target with ``os.replace``: a kill leaves the old file or the new
one, never half of one; the temporary files of writers that were killed are removed by the next
write of the same target.

Every mapping written by :func:`atomic_save` carries a SHA-256 digest of all it holds (every
tensor, key and value: the metadata loaders rebuild a model and its data from, too) under
:data:`DIGEST_KEY`; :func:`safe_load` checks it and removes the key, so a flipped byte anywhere
in a checkpoint is an error that names the file instead of a silently wrong model or
evaluation. Files without a digest (older checkpoints, other tools' files) load as before;
files of earlier versions, whose digest covers their tensors only, are checked on those.
"""

from __future__ import annotations

import copy
import hashlib
import os
import secrets
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

#: Wrappers training scripts put around a state dict, and key prefixes they add
#: (DataParallel's ``module.``, a Lightning module's ``model.``).
_WRAPPERS = ("state_dict", "model", "model_state")
_PREFIXES = ("module.", "model.")

#: Key under which :func:`atomic_save` stores the digest of a mapping's tensors.
DIGEST_KEY = "attnconv_digest"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose contents no longer match the digest stored when it was written."""


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts / lists / tuples, with its path, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():  # insertion order: torch.save keeps it
            if key != DIGEST_KEY:
                yield from _tensors(value, f"{path}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{path}/{i}")


def _sha256(tensor: torch.Tensor) -> bytes:
    if tensor.is_meta or tensor.numel() == 0:
        return b""
    flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(flat.numpy())).digest()


def tensor_digest(obj: Any, threads: int | None = None) -> str:
    """SHA-256 (hex) over the path, dtype, shape and the SHA-256 of the bytes of every tensor
    in ``obj``.

    Only tensors count: they are what silent corruption damages, and the only part whose
    bytes are large. The tensors are hashed on ``threads`` threads (default: up to 8, one per
    CPU; hashlib releases the GIL), which keeps the check small next to reading the file
    (RESULTS.md, "Checkpoint digest").
    """
    items = []
    for path, tensor in _tensors(obj):
        tensor = tensor.detach()
        items.append((path, tensor if tensor.layout == torch.strided else tensor.to_dense()))
    threads = threads or min(8, os.cpu_count() or 1)
    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(threads) as pool:
            hashes = list(pool.map(_sha256, (t for _, t in items)))
    else:
        hashes = [_sha256(t) for _, t in items]
    digest = hashlib.sha256()
    for (path, tensor), data_hash in zip(items, hashes, strict=True):
        digest.update(f"{path}:{tensor.dtype}:{tuple(tensor.shape)}:".encode() + data_hash)
    return digest.hexdigest()


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every value inside nested dicts / lists / tuples with its path, in a fixed order; a
    container's length and each key's type are part of the paths."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        keys = [k for k in obj if k != DIGEST_KEY]
        yield f"{path}:map[{len(keys)}]", None
        for key in keys:  # insertion order: torch.save keeps it
            yield from _leaves(obj[key], f"{path}/{type(key).__name__}:{key!r}")
        metadata = getattr(obj, "_metadata", None)  # a state dict's versions (load_state_dict)
        if metadata is not None:
            yield from _leaves(metadata, f"{path}._metadata")
    elif isinstance(obj, list | tuple):
        yield f"{path}:seq[{len(obj)}]", None
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}/{i}")
    elif isinstance(obj, set | frozenset):  # no fixed order: hashes differ between processes
        yield path, sorted(map(repr, obj))
    else:
        yield path, obj


def content_digest(obj: Any, threads: int | None = None) -> str:
    """SHA-256 (hex) over everything in ``obj``: each tensor as :func:`tensor_digest` hashes
    it, and every other value (config, class counts, epochs, RNG states) by its path, type and
    ``repr``, so that no byte a loader reads can change unnoticed."""
    leaves = list(_leaves(obj))
    digest = hashlib.sha256()
    digest.update(tensor_digest({"": [v for _, v in leaves if isinstance(v, torch.Tensor)]},
                                threads).encode())
    for path, value in leaves:
        text = "tensor" if isinstance(value, torch.Tensor) else f"{type(value).__name__}:{value!r}"
        digest.update(f"{path}={text}\n".encode())
    return digest.hexdigest()


def _verify(state: dict[str, Any], stored: Any, path: Path) -> None:
    stored = stored if isinstance(stored, Mapping) else {}
    if "content_sha256" in stored:
        expected, actual = stored["content_sha256"], content_digest(state)
    else:  # written by an earlier version: the digest of the tensors alone
        expected, actual = stored.get("sha256"), tensor_digest(state)
    if actual != expected:
        raise CorruptCheckpointError(
            f"{path} is corrupt: its contents do not match the SHA-256 digest stored when it "
            f"was written ({actual[:12]}... != {str(expected)[:12]}...); restore it from a "
            "copy or use another checkpoint")


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Tensors and plain containers from ``path``; anything else is refused (ValueError).

    A digest written by :func:`atomic_save` is verified (CorruptCheckpointError on a mismatch)
    and removed, so the result is what was saved.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device=str(map_location))
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for disallowed globals, zip errors
        raise ValueError(f"refusing to load {path}: it is not a plain weights/checkpoint file "
                         f"readable with weights_only=True, or it is damaged "
                         f"({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and DIGEST_KEY in state:
        _verify(state, state.pop(DIGEST_KEY), path)
    return state


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
        if key == DIGEST_KEY:  # a mapping read with torch.load instead of safe_load
            continue
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        cleaned[key] = value
    return cleaned


def _tmp_name(path: Path) -> Path:
    # The writer's PID in the name tells the next write whether the file is abandoned.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files of earlier writes of ``path`` whose writer is dead (killed
    mid-write); a live writer's file is kept. Returns what was deleted.

    Files without a PID in their name (``.NAME.XXXXXXXX.tmp``, from versions before the PID
    was recorded) are deleted too. The PID test is per machine: on a folder shared by several
    machines, a writer on another machine must not write the same target at the same time
    (under DDP only rank 0 writes).
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        middle = tmp.name[len(path.name) + 2:-len(".tmp")].split(".")
        pid = int(middle[0]) if len(middle) == 2 and middle[0].isdigit() else None
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:  # another writer cleaned it first
            pass
    return removed


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file and os.replace.

    A mapping gets the digest of its contents (:func:`content_digest`) under
    :data:`DIGEST_KEY` (``obj`` itself is not changed). The file gets the mode the umask gives
    a new file, like ``open(path, 'wb')``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    if isinstance(obj, dict):
        digest = content_digest(obj)
        obj = copy.copy(obj)  # keeps the type and attributes (a state dict's _metadata)
        obj[DIGEST_KEY] = {"content_sha256": digest}
    tmp = _tmp_name(path)
    # os.open with 0o666 applies the umask, as open() does; mkstemp would force 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder is synced (POSIX; not on Windows).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
