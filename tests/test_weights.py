"""Weight files: the digest of every tensor and key stored in a checkpoint and checked on
load, writes that survive being killed mid-way, and the file mode they get."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from attnconv.engine.checkpoint import SafeCheckpointIO
from attnconv.weights import (
    DIGEST_KEY,
    CorruptCheckpointError,
    atomic_save,
    content_digest,
    read_state_dict,
    remove_stale_temporaries,
    safe_load,
    tensor_digest,
)

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"state_dict": {"conv.weight": torch.randn(16, 8, 3, 3, generator=g),
                           "bn.num_batches_tracked": torch.tensor(7)},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.randn(50, generator=g)}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "epoch": 3}


def _flip_inside(path: Path, tensor: torch.Tensor, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``tensor``'s stored bytes (found in the file)."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    start = data.find(raw)
    assert start >= 0 and data.find(raw, start + 1) < 0
    middle = start + len(raw) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- a digest of the tensors and metadata in every checkpoint -----------------------------

def test_digest_is_stored_verified_and_removed(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    atomic_save(ckpt, tmp_path / "a.ckpt")
    assert DIGEST_KEY not in ckpt  # the caller's dict is not changed
    raw = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert raw[DIGEST_KEY] == {"content_sha256": content_digest(ckpt)}
    loaded = safe_load(tmp_path / "a.ckpt")
    assert DIGEST_KEY not in loaded and loaded.keys() == ckpt.keys()
    torch.testing.assert_close(loaded["state_dict"], ckpt["state_dict"])
    assert read_state_dict(raw).keys() == {"conv.weight", "bn.num_batches_tracked"}


def test_digest_sees_every_tensor_byte_and_name() -> None:
    ckpt = _checkpoint()
    base = tensor_digest(ckpt)
    assert tensor_digest(_checkpoint()) == base
    changed = _checkpoint()
    changed["optimizer_states"][0]["state"][0]["momentum_buffer"][17] += 1e-7
    assert tensor_digest(changed) != base
    renamed = _checkpoint()
    renamed["state_dict"]["conv.bias"] = renamed["state_dict"].pop("conv.weight")
    assert tensor_digest(renamed) != base
    reshaped = _checkpoint()
    reshaped["state_dict"]["conv.weight"] = reshaped["state_dict"]["conv.weight"].view(16, 72)
    assert tensor_digest(reshaped) != base
    bf16 = {"w": torch.randn(4, 4).to(torch.bfloat16), "s": torch.tensor(1.5)}
    assert tensor_digest(bf16) != tensor_digest({"w": bf16["w"].float(), "s": bf16["s"]})


def test_flipped_bytes_in_a_weight_are_an_error_naming_the_file(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    path = tmp_path / "best.ckpt"
    atomic_save(ckpt, path)
    _flip_inside(path, ckpt["state_dict"]["conv.weight"])
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is corrupt: its contents do not"):
        safe_load(path)
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        SafeCheckpointIO().load_checkpoint(path)


def test_one_changed_byte_of_metadata_is_an_error(tmp_path: Path) -> None:
    # What `attnconv eval` rebuilds the data from: image_size 16 -> 8 evaluated silently.
    ckpt = {**_checkpoint(), "attnconv": {"config": {"data": {"image_size": 16}},
                                          "num_classes": 10}}
    path = tmp_path / "best.ckpt"
    atomic_save(ckpt, path)
    data = path.read_bytes()
    found = re.search(rb"image_size(?:q.|r....)?K\x10", data, re.DOTALL)
    assert found and len(re.findall(rb"image_size", data)) == 1
    end = found.end() - 1
    path.write_bytes(data[:end] + b"\x08" + data[end + 1:])
    assert torch.load(path, weights_only=True)["attnconv"]["config"]["data"]["image_size"] == 8
    with pytest.raises(CorruptCheckpointError, match=rf"{path} is corrupt"):
        safe_load(path)


@pytest.mark.parametrize("change", ["value", "key", "added", "type"])
def test_the_digest_covers_every_key_and_value(change: str) -> None:
    ckpt = {**_checkpoint(), "attnconv": {"config": {"seed": 0, "name": "a"}, "classes": [1, 2]}}
    changed = {**ckpt, "attnconv": {"config": {"seed": 0, "name": "a"}, "classes": [1, 2]}}
    meta = changed["attnconv"]
    if change == "value":
        meta["config"]["name"] = "b"
    elif change == "key":
        meta["config"] = {"seed": 0, "nam": "a"}
    elif change == "added":
        meta["classes"].append(3)
    else:
        meta["config"]["seed"] = 0.0
    assert content_digest(ckpt) == content_digest(_copy_of(ckpt))
    assert content_digest(changed) != content_digest(ckpt)


def _copy_of(ckpt: dict) -> dict:
    return {**ckpt, "attnconv": {"config": dict(ckpt["attnconv"]["config"]),
                                 "classes": list(ckpt["attnconv"]["classes"])}}


def test_a_digest_of_the_tensors_alone_is_still_checked(tmp_path: Path) -> None:
    # Files of earlier versions carry {"sha256": digest of the tensors}.
    ckpt = _checkpoint()
    torch.save({**ckpt, DIGEST_KEY: {"sha256": tensor_digest(ckpt)}}, tmp_path / "old.ckpt")
    assert safe_load(tmp_path / "old.ckpt").keys() == ckpt.keys()
    _flip_inside(tmp_path / "old.ckpt", ckpt["state_dict"]["conv.weight"])
    with pytest.raises(CorruptCheckpointError, match="is corrupt"):
        safe_load(tmp_path / "old.ckpt")


def test_a_state_dict_keeps_its_type_and_metadata(tmp_path: Path) -> None:
    state = torch.nn.BatchNorm2d(3).state_dict()
    atomic_save(state, tmp_path / "bn.pth")
    loaded = safe_load(tmp_path / "bn.pth")
    assert type(loaded) is type(state) and loaded._metadata == state._metadata
    assert list(loaded) == list(state)
    torch.nn.BatchNorm2d(3).load_state_dict(loaded)


def test_checkpoints_without_a_digest_still_load(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    torch.save(ckpt, tmp_path / "old.ckpt")
    _flip_inside(tmp_path / "old.ckpt", ckpt["state_dict"]["conv.weight"])  # undetectable
    assert safe_load(tmp_path / "old.ckpt").keys() == ckpt.keys()
    torch.save(ckpt["state_dict"], tmp_path / "plain.pth")
    assert read_state_dict(tmp_path / "plain.pth").keys() == ckpt["state_dict"].keys()


def test_lightning_checkpoint_io_writes_the_digest(tmp_path: Path) -> None:
    io = SafeCheckpointIO()
    io.save_checkpoint(_checkpoint(), tmp_path / "last.ckpt")
    assert DIGEST_KEY in torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert DIGEST_KEY not in io.load_checkpoint(tmp_path / "last.ckpt")

# ---- writes killed mid-way, and the file mode ------------------------------------------------

_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    import torch
    from attnconv.weights import atomic_save

    def stuck_save(obj, f):  # writes part of a file, then waits to be killed
        f.write(b"x" * 65536)
        f.flush()
        open(sys.argv[2], "w").close()
        time.sleep(120)

    torch.save = stuck_save
    atomic_save({"w": torch.zeros(3)}, sys.argv[1])
""")


def _kill_mid_write(target: Path) -> None:
    """Start a process writing ``target`` and SIGKILL it, by PID, in the middle of the write."""
    marker = target.parent / f"writing-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target), str(marker),
                             str(ROOT)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()  # reaped: its PID no longer names a process
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow  # starts a Python that imports torch
def test_a_kill_mid_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path: Path
                                                                          ) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(3)}, target)
    _kill_mid_write(target)
    (leftover,) = tmp_path.glob(".last.ckpt.*.tmp")
    assert leftover.stat().st_size >= 65536
    torch.testing.assert_close(safe_load(target)["w"], torch.ones(3))  # the old file, whole
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # exited and reaped
    earlier = tmp_path / f".last.ckpt.{int(dead.stdout)}.0123abcd.tmp"
    earlier.write_bytes(b"x" * 100)
    other = tmp_path / f".best.ckpt.{int(dead.stdout)}.abcd1234.tmp"  # another target's
    other.write_bytes(b"x")
    atomic_save({"w": torch.full((3,), 2.0)}, target)
    assert sorted(tmp_path.glob(".last.ckpt.*.tmp")) == [] and other.exists()
    torch.testing.assert_close(safe_load(target)["w"], torch.full((3,), 2.0))


def test_a_live_writers_temporary_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".last.ckpt.{sleeper.pid}.0123abcd.tmp"
        live.write_bytes(b"in progress")
        legacy = tmp_path / ".last.ckpt.k2_j9x1q.tmp"  # tempfile.mkstemp's name, no PID
        legacy.write_bytes(b"old")
        assert remove_stale_temporaries(target) == [legacy]
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(target) == [live]


def test_checkpoints_get_the_umask_default_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_save({"w": torch.zeros(1)}, tmp_path / "a.ckpt")
        SafeCheckpointIO().save_checkpoint({"w": torch.zeros(1)}, tmp_path / "b.ckpt")
    finally:
        os.umask(old)
    for name in ("a.ckpt", "b.ckpt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640  # 0o666 & ~0o027
