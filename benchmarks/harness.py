"""The one timing harness of ``benchmarks/``: what machine, how loaded, interleaved rounds.

Every script here parses its options with :func:`parser`, calls :func:`start` (which refuses to
time anything when the 1-minute load average is above :data:`MAX_LOAD`, unless
``--allow-load``), measures with :func:`measure` and prints with :meth:`Run.table`, whose
header names the command line, CPU, caches, threads, torch version and the load before the
run and now. A figure taken under load is marked "not comparable" wherever it is printed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnconv.engine.tables import markdown_table
from attnconv.ops._build import cpu_model

#: Highest 1-minute load average before a run whose figures are recorded.
MAX_LOAD = 0.5
CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def cache_sizes(root: Path = CACHE_DIR) -> str:
    """``L1d 32K, L2 512K, L3 32768K`` from sysfs (per core for L1d/L2), or "unknown"."""
    sizes = {}
    for index in sorted(root.glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            sizes[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return ", ".join(f"{k} {v}" for k, v in sizes.items()) or "unknown"


def load_average() -> float:
    return os.getloadavg()[0]


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="torch threads; several values measure each (scaling)")
    p.add_argument("--allow-load", action="store_true",
                   help=f"time even when the load average is above {MAX_LOAD}; every figure is "
                        "then marked not comparable")
    return p


@dataclass
class Run:
    """One benchmark run: the machine and the load it started under."""

    allow_load: bool
    load_before: float = field(default_factory=load_average)
    command: str = field(default_factory=lambda: shlex.join(["python", *sys.argv]))

    @property
    def comparable(self) -> bool:
        return self.load_before <= MAX_LOAD

    def header(self, threads: int | None = None) -> str:
        threads = torch.get_num_threads() if threads is None else threads
        lines = [f"command: `{self.command}`",
                 f"CPU: {cpu_model()} ({os.cpu_count()} logical cores; caches {cache_sizes()})",
                 f"torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}",
                 f"load average (1 min): {self.load_before:.2f} before the run, "
                 f"{load_average():.2f} now"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            lines.insert(2, f"GPU: {torch.cuda.get_device_name()}")
        if not self.comparable:
            lines.insert(0, f"**not comparable (load {self.load_before:.2f} before the run)**")
        return "\n".join(f"- {line}" for line in lines)

    def table(self, title: str, headers: Sequence[str], rows: Iterable[Sequence[object]], *,
              threads: int | None = None, timed: bool = True, file=None) -> str:
        """Print (and return) a markdown table under ``title`` and the run's header; a timed
        table's title says "not comparable" when the run started under load."""
        if timed and not self.comparable:
            title = f"{title} -- not comparable (load {self.load_before:.2f} before the run)"
        text = f"### {title}\n\n{self.header(threads)}\n\n{markdown_table(headers, rows)}\n"
        print(text, file=file or sys.stdout, flush=True)
        return text

    def finish(self) -> None:
        print(f"load average (1 min): {self.load_before:.2f} before the run, "
              f"{load_average():.2f} after", flush=True)


def start(args: argparse.Namespace, *, timed: bool = True) -> Run:
    """The run, or SystemExit with one line when it would time on a loaded machine."""
    run = Run(allow_load=args.allow_load)
    if timed and not run.comparable and not args.allow_load:
        raise SystemExit(f"load average {run.load_before:.2f} > {MAX_LOAD}: figures taken now "
                         "are not comparable; wait for an idle machine or pass --allow-load")
    return run


@dataclass
class Timings:
    """Seconds per call of each candidate, from the same interleaved rounds."""

    samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def min(self, name: str) -> float:
        return min(self.samples[name])

    def ratio(self, name: str, baseline: str) -> float:
        """``name``'s median over ``baseline``'s (above 1: slower than the baseline)."""
        return self.median(name) / self.median(baseline)


def measure(candidates: dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 2,
            threads: int | None = None) -> Timings:
    """Time each candidate once per round, in alternating order (forward, then reversed) so
    that no candidate always runs first or after the same neighbour; ``warmup`` untimed rounds
    first; ``threads`` sets torch's thread count for the measurement."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    try:
        for index in range(warmup + rounds):
            order = list(candidates) if index % 2 == 0 else list(reversed(candidates))
            for name in order:
                _synchronize()
                begin = time.perf_counter()
                candidates[name]()
                _synchronize()
                if index >= warmup:
                    samples[name].append(time.perf_counter() - begin)
    finally:
        torch.set_num_threads(previous)
    return Timings(samples)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
