"""Cost of the checkpoint digest (attnconv.weights): save and load of a ResNet-50 training
checkpoint (weights + SGD momentum, as Lightning writes it) with and without the SHA-256 of its
tensors, timed in interleaved rounds in one process.

    .venv/bin/python benchmarks/bench_digest.py [--rounds 7] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attnconv import create_model
from attnconv.weights import DIGEST_KEY, atomic_save, safe_load, tensor_digest


def plain_atomic_save(obj: object, path: Path) -> None:
    """atomic_save as it was before the digest: temporary file, fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.plain.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model("resnet50")
    state = model.state_dict()
    momentum = {i: {"momentum_buffer": torch.randn_like(p)}
                for i, p in enumerate(model.parameters())}
    checkpoint = {"epoch": 10, "global_step": 5000, "state_dict": state,
                  "optimizer_states": [{"state": momentum, "param_groups": [
                      {"lr": 0.1, "momentum": 0.9, "params": list(range(len(momentum)))}]}]}
    nbytes = sum(t.numel() * t.element_size() for t in state.values()) + sum(
        m["momentum_buffer"].numel() * 4 for m in momentum.values())
    assert tensor_digest(checkpoint) == tensor_digest(checkpoint, threads=1)
    folder = Path(tempfile.mkdtemp(dir=args.dir))
    with_digest, without = folder / "digest.ckpt", folder / "plain.ckpt"
    times: dict[str, list[float]] = {k: [] for k in (
        "save, no digest", "save, digest", "load, no digest", "load, verify digest",
        "digest only", "digest only, 1 thread")}
    for _ in range(args.rounds):
        for name, fn in (
                ("save, no digest", lambda: plain_atomic_save(checkpoint, without)),
                ("save, digest", lambda: atomic_save(checkpoint, with_digest)),
                ("load, no digest", lambda: torch.load(without, weights_only=True)),
                ("load, verify digest", lambda: safe_load(with_digest)),
                ("digest only", lambda: tensor_digest(checkpoint)),
                ("digest only, 1 thread", lambda: tensor_digest(checkpoint, threads=1))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    assert DIGEST_KEY in torch.load(with_digest, weights_only=True)
    size = with_digest.stat().st_size
    for f in (with_digest, without):
        f.unlink()
    folder.rmdir()
    print(f"ResNet-50 checkpoint: {nbytes / 2**20:.1f} MiB of tensors, file {size / 2**20:.1f} "
          f"MiB; {args.rounds} interleaved rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| step | median (s) | min (s) | ratio to the no-digest median |")
    print("|---|---|---|---|")
    base = {"save": statistics.median(times["save, no digest"]),
            "load": statistics.median(times["load, no digest"])}
    for name, values in times.items():
        median = statistics.median(values)
        ref = base.get(name.split(",")[0])
        ratio = f"{median / ref:.2f}" if ref else f"{median / base['load']:.2f} (of load)"
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {ratio} |")


if __name__ == "__main__":
    main()
