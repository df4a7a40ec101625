"""Two processes on CPU (gloo) under torchrun: one epoch on the embedded digits."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from attnconv.weights import safe_load

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nothing listens on now, so concurrent test runs do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_epoch_under_torchrun(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "attnconv.cli", "train",
           "--model_args", "{cifar_stem: true, channels: [8, 8, 16, 16]}",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.max_epochs", "1", "--trainer.progress_bar", "false",
           "--data.batch_size", "64", "--out_dir", str(tmp_path), "--name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = safe_load(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    # DistributedSampler gives each of the 2 processes 719 of the 1,437 training digits, and
    # training drops the last partial batch: floor(719 / 64) = 11 steps (one process: 22).
    assert last["epoch"] == 0 and last["global_step"] == 11
    assert "| resnet18 |" in done.stdout
    assert (tmp_path / "ddp" / "curves.png").is_file()
