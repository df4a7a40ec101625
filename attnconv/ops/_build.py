"""Building and loading the C++ kernels (``csrc/*.cpp``) as a torch operator library.

``make`` builds them once after installing (``python -m attnconv.ops.build``); the first use
builds them only where that step did not run. The build folder belongs to the installation
(``attnconv/ops/_ext/`` beside this file, or a folder of the user cache keyed by the
installation's path when the package is read-only; ``ATTNCONV_BUILD_DIR`` overrides it), so two
checkouts never share or rewrite one. A build is guarded by an ``flock`` that the kernel drops
when the building process dies: a build in another process is waited for with a message and a
time limit (``ATTNCONV_BUILD_WAIT`` seconds, default 600), and torch's own lock file left by a
killed build is recognised as stale and removed. Any failure (no compiler, a compile error,
the time limit) is remembered with a one-line reason; the layers then run their eager
formulation and warn once with that reason.

OpenMP: the kernels parallelise with ``at::parallel_for``, which is OpenMP code compiled into
the extension. The flags come from torch's own build (``torch.__config__``): with its OpenMP
backend the extension is built with ``-fopenmp`` and resolves to the OpenMP runtime torch
already loaded, so ``torch.set_num_threads`` governs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"

#: -march=native lets gcc vectorise the channel loops for the CPU it builds on, which is why the
#: CPU model is part of the build folder's name
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
#: stem -> None (loaded) or the reason it is not
_loaded: dict[str, str | None] = {}


def openmp_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) that give the extension torch's OpenMP, or two empty lists
    where torch was built without it (then ``at::parallel_for`` is serial in torch too)."""
    info = torch.__config__.parallel_info()
    if "parallel backend: OpenMP" not in info:
        return [], []
    if sys.platform == "darwin":  # Apple clang takes OpenMP only through the preprocessor
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the machine type where that is unreadable)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((ln.split(":", 1)[1].strip() for ln in info
                         if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def _flags() -> tuple[list[str], list[str]]:
    cflags, ldflags = openmp_flags()
    return CFLAGS + cflags, ldflags


def library_name(stem: str) -> str:
    """The library's name: the source, torch's version, the CPU and the flags hashed."""
    source = CSRC / f"{stem}.cpp"
    key = hashlib.sha256(source.read_bytes())
    key.update(f"{torch.__version__}|{cpu_model()}|{_flags()}".encode())
    return f"attnconv_{stem}_{key.hexdigest()[:12]}"


def build_root() -> Path:
    """Where this installation keeps its built kernels."""
    override = os.environ.get("ATTNCONV_BUILD_DIR")
    if override:
        return Path(override)
    beside = Path(__file__).resolve().parent / "_ext"
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    installation = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()
    return Path.home() / ".cache" / "attnconv" / installation[:12]


def build_dir(stem: str) -> Path:
    return build_root() / library_name(stem)


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


def _say(message: str) -> None:
    print(f"attnconv: {message}", file=sys.stderr, flush=True)


def wait_limit() -> float:
    """Seconds a first use waits for another process's build (``ATTNCONV_BUILD_WAIT``)."""
    try:
        return max(0.0, float(os.environ.get("ATTNCONV_BUILD_WAIT", "600")))
    except ValueError:
        return 600.0


@contextlib.contextmanager
def build_lock(folder: Path, limit: float, poll: float = 0.5) -> Iterator[bool]:
    """Hold the folder's build lock; yields False when another process held it past
    ``limit`` seconds. The lock is an ``flock``: a killed holder releases it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "a+") as handle:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - start >= limit:
                    yield False
                    return
                if not told:
                    _say(f"waiting up to {limit:.0f} s for another process building the "
                         f"kernel in {folder}")
                    told = True
                time.sleep(poll)
        try:
            # torch before 2.9 locks with a file whose mere existence blocks: holding the
            # flock, such a file is a killed build's
            (folder / "lock").unlink(missing_ok=True)
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_extension(stem: str) -> str | None:
    """Load ``csrc/<stem>.cpp``'s operators into ``torch.ops``, building it first unless it is
    built: None once loaded, else a one-line reason why not."""
    with _lock:
        if stem not in _loaded:
            _loaded[stem] = _load(stem)
        return _loaded[stem]


def is_loaded(stem: str) -> bool:
    return _loaded.get(stem, "") is None


def _library_file(folder: Path, name: str) -> Path | None:
    found = sorted(folder.glob(f"{name}*.so")) + sorted(folder.glob(f"{name}*.pyd"))
    return found[0] if found else None


def _load(stem: str) -> str | None:
    if os.environ.get("ATTNCONV_NO_EXTENSIONS"):
        return "ATTNCONV_NO_EXTENSIONS is set"
    source = CSRC / f"{stem}.cpp"
    if not source.exists():
        return f"{source} is missing from the installation"
    name = library_name(stem)
    folder = build_dir(stem)
    built = _library_file(folder, name)
    if built is not None:
        try:
            torch.ops.load_library(str(built))
            return None
        except Exception:  # a broken file: build it again below
            pass
    return _build(stem, source, name, folder)


def _build(stem: str, source: Path, name: str, folder: Path) -> str | None:
    _put_ninja_on_path()
    limit = wait_limit()
    # cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not our concern
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with build_lock(folder, limit) as held:
            if not held:
                return (f"another process held the build lock of {folder} for more than "
                        f"{limit:.0f} s (ATTNCONV_BUILD_WAIT)")
            built = _library_file(folder, name)
            if built is None:
                _say(f"compiling the {stem} kernel once into {folder} (about a minute)")
            from torch.utils import cpp_extension

            cflags, ldflags = _flags()
            cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags,
                               extra_ldflags=ldflags, build_directory=str(folder),
                               is_python_module=False, verbose=False)
            return None
    except Exception as err:  # any build failure means: use the eager path
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"building {source.name} failed ({type(err).__name__}: {first[:200]})"
    finally:
        log.setLevel(level)
