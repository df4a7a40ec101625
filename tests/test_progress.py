"""What a user sees while a job runs: one bar for the whole job on stderr from its start, the
model table before training, and ``--threads`` reaching the run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attnconv.engine.run as engine_run
from attnconv.analysis.profiling import attention_layers, count_params
from attnconv.cli import main
from attnconv.layers.attention import CAM, AttnConv2d
from attnconv.layers.aw_conv import AWConv2d
from attnconv.layers.rfa_conv import RFAConv2d
from attnconv.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model_args", "{cifar_stem: true, channels: [8, 8, 16, 16]}",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--optim.name", "adamw", "--optim.lr", "0.01"]


class Seen:
    """What was on stdout/stderr, and torch's thread count, each time a run's Trainer started
    fitting (that is, just before that run's first step)."""

    def __init__(self, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
        self.capsys, self.out, self.err, self.at_start, self.threads = capsys, "", "", [], []
        make = engine_run.make_trainer

        def spy(*args, **kwargs):
            trainer = make(*args, **kwargs)
            fit = trainer.fit

            def fit_spy(*fit_args, **fit_kwargs):
                self.read()
                self.at_start.append((self.out, self.err))
                self.threads.append(torch.get_num_threads())
                torch.set_num_threads(1)  # seen; 2 threads on the busy test machine are slow
                return fit(*fit_args, **fit_kwargs)

            trainer.fit = fit_spy
            return trainer

        monkeypatch.setattr(engine_run, "make_trainer", spy)

    def read(self) -> tuple[str, str]:
        captured = self.capsys.readouterr()
        self.out += captured.out
        self.err += captured.err
        return self.out, self.err


@pytest.mark.slow  # tiny training runs: 2-7 s each on the 2 shared, busy cores
def test_compare_draws_one_bar_for_the_whole_job_from_its_start(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = Seen(capsys, monkeypatch)
    main(["compare", "resnet18", "resnet18_rfa", "--seeds", "1", *TINY, "--threads", "2",
          "--out_dir", str(tmp_path)])
    out, err = seen.read()
    # Before the first step the bar is there, saying no run is done; before the second run's
    # first step it says one is done, and with an estimate of the time left.
    assert "compare 0/2 runs" in seen.at_start[0][1]
    first_done = seen.at_start[1][1]
    assert "compare 1/2 runs" in first_done and "2/2 runs" not in first_done
    assert re.search(r"compare 0/2 runs:\s+\d+%\|.*\| \d+/4 \[\d\d:\d\d<\d\d:\d\d", first_done)
    assert "resnet18 s0 epoch 1/1" in first_done
    assert "compare 2/2 runs: 100%" in err
    # Lightning's per-epoch bars are the detail behind trainer.progress_bar: off by default.
    assert "Epoch 0" not in err
    # stdout holds the tables only: no bar, no carriage return.
    assert "\r" not in out and "runs" not in out and "step/s" not in out
    assert "| resnet18_rfa |" in out
    # --threads reached the run (the spy then set 1 again, which the second run saw).
    assert seen.threads == [2, 1]


@pytest.mark.slow  # tiny training runs: 2-7 s each on the 2 shared, busy cores
def test_progress_bar_option_shows_lightning_epochs_and_a_line_per_run(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = Seen(capsys, monkeypatch)
    main(["compare", "resnet18", "--seeds", "2", *TINY, "--trainer.progress_bar", "true",
          "--out_dir", str(tmp_path)])
    out, err = seen.read()
    assert "Epoch 0" in err and "Epoch 0" not in out  # Lightning's bars, on stderr
    assert "compare: run 1/2 (resnet18 s0), 00:" in err
    assert re.search(r"compare: run 2/2 \(resnet18 s1\), \d\d:\d\d elapsed, about \d\d:\d\d "
                     r"left", err)
    assert "compare 0/2 runs" not in err  # the job bar gives way to the lines


@pytest.mark.slow  # tiny training runs: 2-7 s each on the 2 shared, busy cores
def test_train_prints_the_model_table_before_training_and_takes_threads(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = Seen(capsys, monkeypatch)
    main(["train", "--model", "resnet18_rfa", *TINY, "--threads", "2",
          "--out_dir", str(tmp_path), "--name", "r"])
    before, err_before = seen.at_start[0]
    model = create_model("resnet18_rfa", num_classes=10, in_chans=1, cifar_stem=True,
                         channels=[8, 8, 16, 16])
    rfa = sum(isinstance(m, RFAConv2d) for m in model.modules())
    assert rfa == 8
    row = next(line for line in before.splitlines() if line.startswith("| resnet18_rfa |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{count_params(model) / 1e6:.3g}"
    assert cells[3] == f"RFAConv2d x{rfa}: conv1 in layer1-4"
    assert "MACs (M) per 1x8x8 image" in before  # the digits recipe's input
    assert float(cells[2]) > 0
    assert "train resnet18_rfa" in err_before  # its own bar, from before the first step
    out, _ = seen.read()
    assert "| Name | Type" not in out  # Lightning's summary stays off
    assert seen.threads == [2]


def test_attention_layers_name_each_kind_once_with_its_places() -> None:
    model = create_model("resnet50_cbam_aw", num_classes=10, channels=[8, 8, 16, 16])
    groups = {kind: (count, where) for kind, count, where in attention_layers(model)}
    aw = sum(isinstance(m, AWConv2d) for m in model.modules())
    assert groups == {"AWConv2d": (aw, "conv2 in layer1-4"), "CBAM": (aw, "se in layer1-4")}
    # The CAM inside each CAMConv belongs to that conv: not counted again.
    model = create_model("resnet18_camconv", num_classes=10, channels=[8, 8, 16, 16])
    assert sum(isinstance(m, CAM) for m in model.modules()) == 8
    assert attention_layers(model) == [(
        "AttnConv2d(cam)", sum(isinstance(m, AttnConv2d) for m in model.modules()),
        "conv1 in layer1-4")]
    assert attention_layers(create_model("resnet18", num_classes=10,
                                         channels=[8, 8, 16, 16])) == []


@pytest.mark.slow  # tiny training runs: 2-7 s each on the 2 shared, busy cores
def test_train_det_has_threads_the_model_table_and_its_bar(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = Seen(capsys, monkeypatch)
    main(["train-det", "--model", "resnet18_rfa", "--out_dir", str(tmp_path), "--name", "d",
          "--threads", "2", "--model_args",
          "{backbone_args: {channels: [8, 8, 16, 16], layers: [1, 1, 1, 1]}, fpn_channels: 8, "
          "representation_size: 16, min_size: 48, max_size: 48, rpn_pre_nms_top_n_train: 20, "
          "rpn_post_nms_top_n_train: 10, rpn_pre_nms_top_n_test: 20, "
          "rpn_post_nms_top_n_test: 10, box_batch_size_per_image: 8}",
          "--data.synthetic_train", "4", "--data.synthetic_val", "2",
          "--data.synthetic_size", "48", "--data.batch_size", "2", "--trainer.max_epochs", "1",
          "--optim.warmup_iters", "1"])
    before, err_before = seen.at_start[0]
    assert "| fasterrcnn(resnet18_rfa) |" in before and "per 3x48x48 image" in before
    assert "RFAConv2d x4: conv1 in backbone.body.layer1-4" in before  # one block a stage
    assert "train-det resnet18_rfa" in err_before
    _, err = seen.read()
    assert re.search(r"train-det resnet18_rfa: 100%\|.*\| 2/2 \[", err)
    assert seen.threads == [2]


@pytest.mark.parametrize("command", ["train", "compare", "train-det", "demo"])
def test_threads_must_be_a_count(command: str, capsys: pytest.CaptureFixture) -> None:
    models = ["resnet18"] if command == "compare" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, *models, "--threads", "-1"])
    assert exit_info.value.code == 2
    assert "--threads: expected a thread count >= 1, got '-1'" in capsys.readouterr().err


def test_make_trainer_gives_a_run_without_a_job_bar_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    from attnconv.engine.config import TrainerConfig
    from attnconv.engine.progress import EpochBars, JobProgress, RunBar, RunProgress
    from attnconv.engine.trainer import make_trainer, quiet_lightning

    quiet_lightning()

    def kinds(trainer) -> set[type]:
        return {type(c) for c in trainer.callbacks}

    t = TrainerConfig(max_epochs=1, accelerator="cpu", devices="1", limit_train_batches=3,
                      limit_val_batches=1)
    trainer = make_trainer(t, tmp_path / "seg-run", loggers=False)
    assert RunBar in kinds(trainer) and EpochBars not in kinds(trainer)
    trainer.fit(BoringModel())
    assert re.search(r"seg-run: 100%\|.*\| 3/3 \[", capsys.readouterr().err)
    with JobProgress("job") as job:  # a job's own bar: no second one
        assert RunBar not in kinds(make_trainer(t, tmp_path / "r", loggers=False,
                                                callbacks=[job.callback("r")]))
        assert RunProgress in kinds(make_trainer(t, tmp_path / "r", loggers=False,
                                                 callbacks=[job.callback("r")]))
    detail = make_trainer(TrainerConfig(progress_bar=True), tmp_path / "d", loggers=False)
    assert EpochBars in kinds(detail) and RunBar not in kinds(detail)


def test_attention_layers_take_conv_factories_that_are_functions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from attnconv.layers.create import CONV_LAYERS

    # A registry entry may be a function building a plain conv (not a class to look for).
    monkeypatch.setitem(CONV_LAYERS, "checked_conv", lambda *a, **k: torch.nn.Conv2d(*a, **k))
    model = create_model("resnet18_aw", num_classes=10, channels=[8, 8, 16, 16])
    assert attention_layers(model) == [("AWConv2d", 8, "conv1 in layer1-4")]
