"""Cost of the checkpoint digest (attnconv.weights): save and load of a ResNet-50 training
checkpoint (weights + SGD momentum, as Lightning writes it) with and without the SHA-256 of its
tensors, timed in interleaved rounds in one process.

    .venv/bin/python benchmarks/bench_digest.py [--rounds 7] [--dir /tmp] [--quick]
                                                [--allow-load]

``--quick`` uses a narrow ResNet-18 (a smoke test of the script, not a figure).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import harness
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


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--quick", action="store_true", help="a narrow ResNet-18 (smoke test)")
    args = parser.parse_args(argv)
    run = harness.start(args)
    torch.manual_seed(0)
    name = "resnet18" if args.quick else "resnet50"
    model = create_model(name, channels=(8, 16, 32, 64)) if args.quick else create_model(name)
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
    # written once first: the order alternates, so a round's load may run before its save
    plain_atomic_save(checkpoint, without)
    atomic_save(checkpoint, with_digest)
    times = harness.measure({
        "save, no digest": lambda: plain_atomic_save(checkpoint, without),
        "save, digest": lambda: atomic_save(checkpoint, with_digest),
        "load, no digest": lambda: torch.load(without, weights_only=True),
        "load, verify digest": lambda: safe_load(with_digest),
        "digest only": lambda: tensor_digest(checkpoint),
        "digest only, 1 thread": lambda: tensor_digest(checkpoint, threads=1)},
        rounds=args.rounds, warmup=args.warmup, threads=args.threads[0])
    assert DIGEST_KEY in torch.load(with_digest, weights_only=True)
    size = with_digest.stat().st_size
    for f in (with_digest, without):
        f.unlink()
    folder.rmdir()
    rows = []
    for step in times.samples:
        kind = step.split(",")[0]
        ratio = (f"{times.ratio(step, f'{kind}, no digest'):.2f}" if kind in ("save", "load")
                 else f"{times.ratio(step, 'load, no digest'):.2f} (of load)")
        rows.append([step, f"{times.median(step):.3f}", f"{times.min(step):.3f}", ratio])
    run.table(f"{name} checkpoint: {nbytes / 2**20:.1f} MiB of tensors, file "
              f"{size / 2**20:.1f} MiB; median of {args.rounds} interleaved rounds",
              ["step", "median (s)", "min (s)", "ratio to the no-digest median"], rows,
              threads=args.threads[0])
    run.finish()


if __name__ == "__main__":
    main()
