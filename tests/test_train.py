"""Training runs on the embedded digits with a tiny ResNet: outputs, exact resume, non-finite
loss, refusing code-running checkpoints, bad names, evaluation and comparison."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from attnconv.classification.config import ClassificationConfig
from attnconv.classification.report import read_epoch_metrics, welch_interval
from attnconv.classification.run import comparison_table, evaluate, train
from attnconv.engine.config import ConfigError, apply
from attnconv.engine.trainer import NonFiniteLossError
from attnconv.models import ModelNameError
from attnconv.weights import atomic_save, safe_load

TINY_MODEL_ARGS = {"cifar_stem": True, "channels": [8, 8, 16, 16]}


def tiny_config(out_dir: Path, **extra: Any) -> ClassificationConfig:
    """resnet18 with 8-16 channels on 8x8 digits, 6 batches per epoch: seconds per epoch."""
    values: dict[str, Any] = {
        "model": "resnet18", "model_args": TINY_MODEL_ARGS, "out_dir": str(out_dir),
        "data": {"name": "digits", "batch_size": 64},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0, "scheduler": "cosine"},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "devices": 1, "deterministic": True,
                    "progress_bar": False, "limit_train_batches": 10, "limit_val_batches": 3},
    }
    for key, value in extra.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return apply(ClassificationConfig(), values)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Small layers run faster on one thread, and much faster when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["state_dict"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory):
    return train(tiny_config(tmp_path_factory.mktemp("runs"), name="full"))


def test_run_leaves_checkpoints_logs_and_plot(finished_run) -> None:
    r = finished_run
    assert (r.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert r.best_checkpoint == r.run_dir / "checkpoints" / "best.ckpt"
    assert r.best_checkpoint.is_file()
    assert (r.run_dir / "logs" / "metrics.csv").is_file()
    assert any((r.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert r.plot == r.run_dir / "curves.png" and r.plot.read_bytes()[:4] == b"\x89PNG"
    assert not list(r.run_dir.rglob("*.tmp"))  # atomic writes left no temporary file
    # 10 classes: chance is 10%; two short epochs already do better.
    assert 15 < r.top1 <= 100 and r.top1 <= r.top5 <= 100
    assert math.isfinite(r.loss) and r.img_per_s > 0
    assert r.params == sum(p.numel() for p in _weights(r.best_checkpoint).values()
                           if p.is_floating_point()) - _bn_buffers(r.best_checkpoint)
    assert r.macs > 0
    last = safe_load(r.run_dir / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 1 and last["global_step"] == 20
    assert last["attnconv"]["config"]["model"] == "resnet18"


def _bn_buffers(path: Path) -> int:
    return sum(t.numel() for k, t in _weights(path).items()
               if k.endswith(("running_mean", "running_var")))


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        trainer.should_stop = True


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_with_the_same_weights(tmp_path: Path,
                                                            finished_run) -> None:
    cfg = tiny_config(tmp_path, name="resumed")
    train(cfg, callbacks=[_StopAfterFirstEpoch()])
    assert safe_load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["epoch"] == 0
    cfg.resume = "last"
    result = train(cfg)
    expected = _weights(finished_run.run_dir / "checkpoints" / "last.ckpt")
    got = _weights(result.run_dir / "checkpoints" / "last.ckpt")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert result.top1 == pytest.approx(finished_run.top1, abs=1e-6)
    # Both parts of the run are in the curves: the resumed part logs next to the first.
    parts = sorted(result.run_dir.glob("logs*/metrics.csv"))
    assert [p.parent.name for p in parts] == ["logs", "logs-1"]
    val = read_epoch_metrics(parts)["val_top1"]
    assert [epoch for epoch, _ in val] == [0, 1]
    assert val[1][1] == pytest.approx(result.top1 / 100, abs=1e-6)


class _PoisonSecondEpoch(L.Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            with torch.no_grad():
                module.model.fc.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, name="nan")
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 1, step 10"):
        train(cfg, callbacks=[_PoisonSecondEpoch()])
    last = safe_load(tmp_path / "nan" / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == 10
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values()
               if t.is_floating_point())


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, evil)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_RunsCode(marker)))
    for path in (evil, plain):
        with pytest.raises(ValueError, match="refusing to load"):
            safe_load(path)
        with pytest.raises(ValueError, match="refusing to load"):
            evaluate(path)
    with pytest.raises(ValueError, match="refusing to load"):
        train(tiny_config(tmp_path, resume=str(evil)))
    assert not marker.exists()


def test_atomic_save_replaces_or_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    atomic_save({"w": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_save({"w": torch.zeros(2), "x": Unpicklable()}, path)
    assert torch.equal(safe_load(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


def test_unknown_model_name_lists_close_names(tmp_path: Path) -> None:
    with pytest.raises(ModelNameError, match=r"unknown model 'resnet81'.*resnet18"):
        train(tiny_config(tmp_path, model="resnet81"))
    assert not (tmp_path / "resnet81-s0").exists()


def test_missing_resume_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"resume checkpoint .*last.ckpt does not exist"):
        train(tiny_config(tmp_path, resume="last"))


def test_eval_reproduces_the_best_checkpoints_accuracy(finished_run) -> None:
    m = evaluate(finished_run.best_checkpoint)
    best = safe_load(finished_run.best_checkpoint)
    score = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert m["model"] == "resnet18" and m["images"] == 360
    # The checkpoint's score covers limit_val_batches=3 (192 images); eval sees all 360.
    assert 15 < m["top1"] <= m["top5"] <= 100
    assert float(score["best_model_score"]) > 0.15


def test_welch_interval_matches_scipys_welch_test() -> None:
    # a = (1, 2, 3), b = (4, 6, 8): diff 4, se = sqrt(1/3 + 4/3), dof = 50/17 = 2.941,
    # t_0.975(2.941) = 3.2188; scipy.stats.ttest_ind(b, a, equal_var=False)
    # .confidence_interval() gives (-0.15540, 8.15540).
    d, low, high = welch_interval([1, 2, 3], [4, 6, 8])
    assert d == 4
    assert low == pytest.approx(-0.15540, abs=1e-4) and high == pytest.approx(8.15540, abs=1e-4)
    assert welch_interval([1.0], [2.0]) == (1.0, -math.inf, math.inf)


def test_comparison_table_has_mean_std_and_difference(finished_run) -> None:
    import dataclasses
    a = [dataclasses.replace(finished_run, top1=v) for v in (50.0, 52.0, 54.0)]
    b = [dataclasses.replace(finished_run, model="other", top1=v) for v in (60.0, 64.0, 68.0)]
    table = comparison_table({"resnet18": a, "other": b})
    assert "| resnet18 | 52.00 ± 2.00 | — |" in table
    assert "| other | 64.00 ± 4.00 | +12.00 [+3.69, +20.31] |" in table


class _Probe(L.Callback):
    """Records what the trainer of a run was built with."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.callbacks = list(trainer.callbacks)
        self.limit_train_batches = trainer.limit_train_batches


def test_one_run_has_one_throughput_callback_and_int_limits_are_batch_counts(
        tmp_path: Path) -> None:
    from attnconv.engine.callbacks import Throughput

    probe = _Probe()
    # One Throughput callback logs train_img_per_s, and an int limit of 1 stays one batch
    # (1.0 would be all of them for Lightning).
    result = train(tiny_config(tmp_path, name="probe", trainer={"max_epochs": 1,
                                                                "limit_train_batches": 1}),
                   callbacks=[probe])
    assert sum(isinstance(c, Throughput) for c in probe.callbacks) == 1
    assert probe.limit_train_batches == 1 and type(probe.limit_train_batches) is int
    assert safe_load(result.run_dir / "checkpoints" / "last.ckpt")["global_step"] == 1


@pytest.mark.slow
def test_a_compiled_run_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Truth-testing the compiled module would ask AttnResNet for len() at the first step.
    # Dynamo traces forward and backward as it would for inductor; aot_eager skips the C++
    # code generation, which takes minutes on 2 cores.
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    cfg = tiny_config(tmp_path, name="compiled", model="resnet18_aw", compile=True,
                      trainer={"max_epochs": 1, "limit_train_batches": 3,
                               "limit_val_batches": 1, "deterministic": False})
    result = train(cfg)
    last = safe_load(result.run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and math.isfinite(result.loss)
    # The checkpoint keeps the plain model's names, so eval/export rebuild it uncompiled.
    assert not any("_orig_mod" in k for k in last["state_dict"])
    assert evaluate(result.best_checkpoint)["images"] == 360


class _WorseAfterFirstEpoch(L.Callback):
    """Reports val_top1 0 from the second epoch on (Lightning runs checkpoint callbacks last,
    so they see it): every later epoch is worse than the first."""

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch >= 1:
            trainer.callback_metrics["val_top1"] = torch.tensor(0.0)


@pytest.mark.slow
def test_last_checkpoint_is_the_last_epoch_even_when_it_got_worse(tmp_path: Path,
                                                                  capsys) -> None:
    # last.ckpt is every epoch's end, not only the epochs with a new best (epoch 0 here).
    cfg = tiny_config(tmp_path, name="worse", trainer={"max_epochs": 3,
                                                       "limit_train_batches": 2})
    train(cfg, callbacks=[_WorseAfterFirstEpoch()])
    folder = tmp_path / "worse" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert safe_load(folder / "last.ckpt")["epoch"] == 2
    assert safe_load(folder / "last.ckpt")["global_step"] == 6
    assert safe_load(folder / "best.ckpt")["epoch"] == 0
    # --resume last continues after epoch 2; a longer max_epochs is applied, and said.
    capsys.readouterr()
    train(apply(cfg, {"resume": "last", "trainer": {"max_epochs": 4}}),
          callbacks=[_WorseAfterFirstEpoch()])
    assert "resume: applying trainer.max_epochs: 3 -> 4" in capsys.readouterr().out
    assert safe_load(folder / "last.ckpt")["global_step"] == 8


class _HugeWeightsAtSecondValidation(L.Callback):
    """Finite weights whose logits overflow: the training loss of epoch 0 was finite, the
    validation loss of epoch 1 is not, as when training with --optim.lr 1000000."""

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            with torch.no_grad():
                module.model.fc.weight.fill_(3e38)


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in _weights(path).values() if t.is_floating_point())


def test_a_non_finite_validation_loss_stops_before_anything_is_saved(tmp_path: Path) -> None:
    # The validation loss is checked too: a NaN state must become neither best nor last.
    cfg = tiny_config(tmp_path, name="valnan", trainer={"max_epochs": 3,
                                                        "limit_train_batches": 2})
    with pytest.raises(NonFiniteLossError, match=r"val_loss is (nan|inf) after validation of "
                                                 r"epoch 1.*last good checkpoint is .*last.ckpt "
                                                 r"\(epoch 0"):
        train(cfg, callbacks=[_HugeWeightsAtSecondValidation()])
    folder = tmp_path / "valnan" / "checkpoints"
    for name in ("best.ckpt", "last.ckpt"):
        assert safe_load(folder / name)["epoch"] == 0 and _all_finite(folder / name)


class _PoisonFirstStep(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        with torch.no_grad():
            module.model.fc.weight.fill_(float("nan"))


def test_a_stop_before_any_checkpoint_says_there_is_none(tmp_path: Path) -> None:
    # "The last good checkpoint" is named only where one exists.
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        train(tiny_config(tmp_path, name="early"), callbacks=[_PoisonFirstStep()])
    assert not (tmp_path / "early" / "checkpoints").exists()


def test_an_enormous_learning_rate_never_leaves_a_non_finite_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, name="lr", optim={"name": "sgd", "lr": 1e6},
                      trainer={"max_epochs": 3, "limit_train_batches": 3})
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    for path in (tmp_path / "lr").rglob("*.ckpt"):
        state = safe_load(path)
        assert _all_finite(path)
        scores = [v.get("best_model_score") for k, v in state["callbacks"].items()
                  if k.startswith("ModelCheckpoint") and v.get("best_model_score") is not None]
        assert all(math.isfinite(float(s)) for s in scores)


def test_resume_refuses_changed_options_it_cannot_apply(tmp_path: Path) -> None:
    # --optim.lr under --resume would train at the old lr and record the new one.
    cfg = tiny_config(tmp_path, name="changed", trainer={"max_epochs": 2,
                                                         "limit_train_batches": 2})
    train(cfg, callbacks=[_StopAfterFirstEpoch()])
    before = (tmp_path / "changed" / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=r"--resume continues .*optim.lr 0.01 -> 0.5, "
                                          r"optim.scheduler 'cosine' -> 'constant'"):
        train(apply(cfg, {"resume": "last", "optim": {"lr": 0.5, "scheduler": "constant"}}))
    assert (tmp_path / "changed" / "checkpoints" / "last.ckpt").read_bytes() == before


def test_a_run_folder_belongs_to_one_run(tmp_path: Path) -> None:
    # A second run with the same name must not write best-v1.ckpt beside the first run's files.
    cfg = tiny_config(tmp_path, name="same", trainer={"max_epochs": 1, "limit_train_batches": 1})
    train(cfg)
    with pytest.raises(ConfigError, match=r"run folder .*same holds an earlier run: pass "
                                          r"--resume last .*--overwrite true"):
        train(cfg)
    train(apply(cfg, {"overwrite": True, "trainer": {"limit_train_batches": 2}}))
    folder = tmp_path / "same"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt",
                                                                         "last.ckpt"]
    assert [p.parent.name for p in folder.glob("logs*/metrics.csv")] == ["logs"]
    assert safe_load(folder / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_more_devices_than_gpus_is_refused_naming_what_exists(tmp_path: Path) -> None:
    from attnconv.engine.trainer import check_devices

    wanted = max(2, torch.cuda.device_count() + 1)
    found = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"trainer.devices {wanted}: this machine has "
                                          rf"{found} GPU"):
        train(tiny_config(tmp_path, name="dev", trainer={"devices": str(wanted),
                                                         "accelerator": "auto"}))
    assert not (tmp_path / "dev").exists()
    cfg = tiny_config(tmp_path, trainer={"devices": str(wanted), "accelerator": "cpu"})
    check_devices(cfg.trainer)  # CPU processes, asked for by name, are allowed


def test_one_schedule_serves_both_tasks_in_their_units() -> None:
    # The two former lr_factors (epochs for classification, steps for detection), written out
    # as they were, against the engine's one schedule behind both.
    from attnconv.classification.config import OptimConfig
    from attnconv.classification.module import lr_factor as cls_factor
    from attnconv.detection.config import DetOptimConfig
    from attnconv.detection.module import lr_factor as det_factor

    def old_cls(epoch: int, o: OptimConfig, max_epochs: int) -> float:
        if epoch < o.warmup_epochs:
            return (epoch + 1) / (o.warmup_epochs + 1)
        if o.scheduler == "multistep":
            return o.gamma ** sum(epoch >= m for m in o.milestones)
        if o.scheduler == "cosine":
            span = max(1, max_epochs - o.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * (epoch - o.warmup_epochs) / span))
        return 1.0

    def old_det(step: int, per_epoch: int, o: DetOptimConfig) -> float:
        factor = o.gamma ** sum(step >= m * per_epoch for m in o.milestones)
        if step < o.warmup_iters:
            alpha = step / o.warmup_iters
            factor *= o.warmup_factor * (1 - alpha) + alpha
        return factor

    for scheduler in ("multistep", "cosine", "constant"):
        for warmup in (0, 1, 3):
            o = OptimConfig(scheduler=scheduler, warmup_epochs=warmup, milestones=[5, 8])
            for epoch in range(12):
                assert cls_factor(epoch, o, 12) == pytest.approx(old_cls(epoch, o, 12),
                                                                 rel=1e-12), (o, epoch)
    d = DetOptimConfig(milestones=[2, 3], warmup_iters=50, warmup_factor=0.001)
    for per_epoch in (7, 23, 100):
        for step in range(4 * per_epoch):
            assert det_factor(step, per_epoch, d) == pytest.approx(old_det(step, per_epoch, d),
                                                                   rel=1e-12), (per_epoch, step)


def test_a_folder_holding_anything_but_a_run_is_never_taken_or_emptied(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, trainer={"max_epochs": 1, "limit_train_batches": 1})
    train(apply(cfg, {"name": "runA"}))
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "important.txt").write_text("keep me")
    for folder, what in ((tmp_path, "mydata, runA"), (mydata, "important.txt")):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=rf"run folder {folder} holds files that are "
                                                  rf"not a run's \({what}\)"):
                train(apply(cfg, {"out_dir": str(folder.parent), "name": folder.name,
                                  "overwrite": overwrite}))
    assert (mydata / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in mydata.iterdir()) == ["important.txt"]
    assert (tmp_path / "runA" / "checkpoints" / "last.ckpt").is_file()
    for name in (".", "..", "../x", str(tmp_path / "abs")):
        with pytest.raises(ConfigError, match="name must be a plain folder name"):
            train(apply(cfg, {"name": name}))
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"out_dir .*afile is a file"):
        train(apply(cfg, {"out_dir": str(tmp_path / "afile"), "name": "r"}))


_HOLD_LOCK = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.truncate(0); handle.write(str(os.getpid())); handle.flush()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_a_folder_in_use_is_refused_and_a_killed_runs_lock_is_gone(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tiny_config(tmp_path, name="busy", trainer={"max_epochs": 1, "limit_train_batches": 1})
    folder = tmp_path / "busy"
    (folder / "logs").mkdir(parents=True)  # the other run has started writing
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"run folder {folder} is in use by another run "
                                              rf"\(process {holder.pid}\)"):
            train(cfg)
    finally:
        holder.kill()  # as a run killed mid-way: the kernel drops its lock
        holder.wait()
    with pytest.raises(ConfigError, match="holds an earlier run: pass --overwrite true"):
        train(cfg)
    train(apply(cfg, {"overwrite": True}))
    assert (folder / "checkpoints" / "last.ckpt").is_file()


def test_a_run_refused_while_reading_its_data_leaves_nothing_and_the_fix_runs(
        tmp_path: Path) -> None:
    from attnconv.errors import DataError

    cfg = tiny_config(tmp_path, name="big", trainer={"max_epochs": 1, "limit_train_batches": 1})
    with pytest.raises(DataError, match="larger than the training set"):
        train(apply(cfg, {"data": {"batch_size": 4096}}))
    assert not (tmp_path / "big").exists()
    train(apply(cfg, {"data": {"batch_size": 32}}))
    assert (tmp_path / "big" / "checkpoints" / "last.ckpt").is_file()


def test_an_earlier_run_is_offered_for_resume_only_when_a_resume_would_work(
        tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, name="r", trainer={"max_epochs": 1, "limit_train_batches": 1})
    train(cfg)
    with pytest.raises(ConfigError, match="pass --resume last to continue it"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"it ran with other settings \(data.batch_size 64 -> "
                                          r"32\), so it cannot be resumed with these; pass "
                                          r"--overwrite true") as refused:
        train(apply(cfg, {"data": {"batch_size": 32}}))
    assert "--resume" not in str(refused.value)
    (tmp_path / "r" / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(ConfigError, match=r"holds an earlier run: pass --overwrite true") as no:
        train(cfg)
    assert "--resume" not in str(no.value)


def test_the_printed_figures_name_their_epoch_and_file_and_the_best_when_another(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from attnconv.cli import main

    # The monitored score drops after epoch 0: best.ckpt is epoch 0, the figures are epoch 1's.
    cfg = tiny_config(tmp_path, name="w", trainer={"max_epochs": 2, "limit_train_batches": 2})
    result = train(cfg, callbacks=[_WorseAfterFirstEpoch()])
    last, best = tmp_path / "w" / "checkpoints" / "last.ckpt", result.best_checkpoint
    assert (result.last.path, result.last.epoch) == (last, 1)
    assert (result.best.path, result.best.epoch) == (best, 0) and result.best.score > 0
    assert result.note() == (f"figures of epoch 2/2 (the last), {last}; the best epoch was 1/2 "
                             f"(top-1 {100 * result.best.score:.2f}), {best}")
    # The command prints the note under its table.
    main(["train", "--out_dir", str(tmp_path), "--name", "c", "--model_args",
          "{cifar_stem: true, channels: [8, 8, 16, 16]}", "--trainer.accelerator", "cpu",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
          "--trainer.limit_val_batches", "1"])
    out = capsys.readouterr().out
    ckpts = tmp_path / "c" / "checkpoints"
    assert (f"figures of epoch 1/1 (the last), {ckpts / 'last.ckpt'}; it is also the best "
            f"epoch ({ckpts / 'best.ckpt'})") in out
