"""The ``attnconv`` command: train, eval and compare end to end, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnconv.cli import main

TINY = ["--model_args", "{cifar_stem: true, channels: [8, 8, 16, 16]}",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1",
        "--trainer.progress_bar", "false", "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2", "--optim.name", "adamw", "--optim.lr", "0.01"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["train", *TINY, "--out_dir", str(tmp_path), "--name", "r"])
    out = capsys.readouterr().out
    assert "| model | top-1 (%) | top-5 (%) | val loss | params (M) | MACs (M) |" in out
    assert f"run folder: {tmp_path / 'r'}" in out
    main(["eval", "--checkpoint", str(tmp_path / "r" / "checkpoints" / "best.ckpt")])
    line = capsys.readouterr().out
    assert line.startswith("resnet18: top-1 ") and "on 360 validation images" in line


def test_compare_two_models_two_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["compare", "resnet18", "resnet18_aw", "--seeds", "2", *TINY,
          "--out_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| resnet18 |" in out and "| resnet18_aw |" in out and "— |" in out
    assert sorted(p.name for p in (tmp_path / "compare").iterdir()) == [
        "compare.md", "compare.png", "resnet18-s0", "resnet18-s1", "resnet18_aw-s0",
        "resnet18_aw-s1"]
    with pytest.raises(SystemExit) as exit_info:  # the folders are taken; compare has no resume
        main(["compare", "resnet18", "resnet18_aw", "--seeds", "2", *TINY,
              "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds an earlier run: pass --overwrite true" in err
    assert "--resume" not in err


def test_unknown_key_in_recipe_exits_before_training(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(recipe), "--out_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "unknown config key 'trainer.epochs'" in err
    assert "did you mean trainer.max_epochs" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_viz_of_a_checkpoint_trained_on_the_grayscale_digits(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    # The stem takes the data's channels (an RGB image must not meet a 1-channel stem).
    main(["train", *TINY, "--model", "resnet18_aw", "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "1", "--out_dir", str(tmp_path), "--name", "d"])
    capsys.readouterr()
    main(["viz", "--model", "resnet18_aw", "--checkpoint",
          str(tmp_path / "d" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "viz")])
    assert "aw_attention.png" in capsys.readouterr().out
    assert (tmp_path / "viz" / "aw_attention.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_killed_run_resumes_and_its_folder_is_not_taken_by_a_new_run(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from attnconv.weights import safe_load

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run = [sys.executable, "-m", "attnconv.cli", "train", *TINY, "--out_dir", str(tmp_path),
           "--name", "k"]
    last = tmp_path / "k" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([*run, "--trainer.max_epochs", "100"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.is_file(), proc.stderr.read().decode()[-2000:] if proc.poll() else "slow"
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-run, possibly mid-write
        proc.wait()
    epoch = safe_load(last)["epoch"]  # the file is whole: written atomically
    again = subprocess.run([*run, "--trainer.max_epochs", "100"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 2 and "holds an earlier run" in again.stderr
    resumed = subprocess.run([*run, "--resume", "last", "--trainer.max_epochs", str(epoch + 2)],
                             cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resume: applying trainer.max_epochs: 100 -> {epoch + 2}" in resumed.stdout
    assert "exists and is not empty" not in resumed.stderr  # Lightning's notice, not ours
    assert safe_load(last)["epoch"] == epoch + 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--optim.gamma", "-1"], "optim.gamma must be > 0.0, not -1.0"),
    (["--optim.gamma", "0"], "optim.gamma must be > 0.0, not 0.0"),
    (["--seed", "-1"], "seed must be >= 0 and <= 4294967295, not -1"),
    (["--seed", str(2**70)], f"seed must be >= 0 and <= 4294967295, not {2**70}"),
    (["--data.val_fraction", "0"], "data.val_fraction must be > 0.0 and < 1.0, not 0.0"),
    (["--data.val_fraction", "1"], "data.val_fraction must be > 0.0 and < 1.0, not 1.0"),
    (["--optim.label_smoothing", "1.5"],
     "optim.label_smoothing must be >= 0.0 and < 1.0, not 1.5"),
    (["--optim.momentum", "1.5"], "optim.momentum must be >= 0.0 and <= 1.0, not 1.5"),
    (["--optim.milestones", "[3, -1]"], "each of optim.milestones must be >= 0, not [3, -1]"),
    (["--trainer.devices", "-1"], "trainer.devices must be a count >= 1, a list of device "
                                  "indices such as '0,1', or auto, not '-1'"),
    (["--trainer.devices", "0,-1"], "trainer.devices must be a count >= 1"),
    (["--model_args", "{channels: [8]}"],
     "model_args.channels must be 4 widths >= 1, one per ResNet stage, not [8]"),
    (["--model_args", "{channels: [0, 8, 8, 8]}"], "model_args.channels must be 4 widths >= 1"),
    (["--model_args", "{channels: [8, 8"], "--model_args is not valid YAML"),
    (["--data.image_size", "100000"], "data.image_size must be >= 8 and <= 4096, not 100000"),
    (["--data.image_size", "2"], "data.image_size must be >= 8 and <= 4096, not 2"),
    (["--threads", "0"], "--threads: expected a thread count >= 1, got '0'"),
    (["--name", "."], "name must be a plain folder name"),
    (["--name", ".."], "name must be a plain folder name"),
    (["--name", "../x"], "name must be a plain folder name"),
    (["--name", "/tmp/x"], "name must be a plain folder name"),
])
def test_train_options_out_of_range_are_refused_in_one_line(
        argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *TINY, "--out_dir", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    # One line (argparse's own refusals, --threads, come after the usage lines).
    assert message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "runs").exists()


def test_an_option_states_its_range_in_its_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lr factor at each milestone; > 0.0 (default: 0.1)" in text
    assert "held out for validation; > 0.0 and < 1.0 (default: 0.2)" in text
    assert "multiplied by gamma; each >= 0 (default: [30, 60, 90])" in text
