"""Build-on-first-use of the C++ kernels (torch.utils.cpp_extension.load), cached on disk.

The extension is compiled once per (source, torch version, CPU model) into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and loaded from there
afterwards. Any failure (no compiler, no ninja, a compile error) is remembered with its reason:
callers fall back to the eager formulation and warn once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"

#: the optimisation flags: -march=native lets gcc vectorise the channel loops for the CPU it
#: builds on, which is why the CPU model is part of the cache key
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_cache: dict[str, ModuleType | str] = {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((ln.split(":", 1)[1].strip() for ln in info
                         if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def _name(source: Path) -> str:
    key = hashlib.sha256(source.read_bytes())
    key.update(f"{torch.__version__}|{_cpu_model()}|{CFLAGS}".encode())
    return f"attnconv_{source.stem}_{key.hexdigest()[:12]}"


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the pip package's binary is not on it when the
    virtualenv's python runs without the environment being activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load_extension(stem: str) -> ModuleType | str:
    """The compiled module ``csrc/<stem>.cpp``, or a one-line reason why it is unavailable."""
    with _lock:
        if stem not in _cache:
            _cache[stem] = _build(stem)
        return _cache[stem]


def _build(stem: str) -> ModuleType | str:
    if os.environ.get("ATTNCONV_NO_EXTENSIONS"):
        return "ATTNCONV_NO_EXTENSIONS is set"
    source = CSRC / f"{stem}.cpp"
    if not source.exists():
        return f"{source} is missing from the installation"
    _put_ninja_on_path()
    # cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not our concern
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name=_name(source), sources=[str(source)],
                                  extra_cflags=CFLAGS, verbose=False)
    except Exception as err:  # any build failure means: use the eager path
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"building {source.name} failed ({type(err).__name__}: {first[:200]})"
    finally:
        log.setLevel(level)
