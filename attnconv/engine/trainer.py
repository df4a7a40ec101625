"""The Lightning pieces every task shares: trainer construction, quiet logging, the DDP-safe
non-finite stop, atomic weights-only checkpoints and resume."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from attnconv.engine.config import ConfigError, TrainerConfig
from attnconv.engine.progress import EpochBars, RunBar, RunProgress
from attnconv.training.callbacks import RNGState
from attnconv.training.checkpoint import SafeCheckpointIO


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the weights of that step are not applied."""


def quiet_lightning() -> None:
    """Keep Lightning's start-up notices and small-data warnings out of the user's output."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*LeafSpec.*", ".*isinstance.*treespec.*",
                    # A resume writes into its own run's folder (prepare_run_dir refuses others).
                    ".*Checkpoint directory .* exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=message)


def stop_if_not_finite(module: L.LightningModule, loss: torch.Tensor, what: str = "") -> None:
    """NonFiniteLossError when ``loss`` is NaN or infinite on any process.

    All processes decide together, so that no DDP rank waits for one that stopped.
    """
    finite = bool(torch.isfinite(loss).all())
    if not module.trainer.strategy.reduce_boolean_decision(finite, all=True):
        value = "not finite on another process" if finite else loss.detach().float().item()
        raise NonFiniteLossError(
            f"training loss is {value} at epoch {module.current_epoch}, step "
            f"{module.global_step}{what}; the run stopped (lower optim.lr, add warm-up, or "
            "use precision 32-true)")


class FiniteGuard(L.Callback):
    """Stops the run (NonFiniteLossError) when the weights or the validation loss stop being
    finite, before the checkpoint callbacks (which Lightning runs last) could save that state
    as best or last."""

    def __init__(self, val_loss: str | None = None) -> None:
        self.val_loss = val_loss

    def _check(self, trainer: L.Trainer, module: L.LightningModule, when: str) -> None:
        bad = next((n for n, p in module.named_parameters() if not torch.isfinite(p).all()),
                   None)
        loss = trainer.callback_metrics.get(self.val_loss) if self.val_loss else None
        loss_bad = loss is not None and not bool(torch.isfinite(loss).all())
        finite = bad is None and not loss_bad
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            what = (f"weight {bad} is not finite" if bad else
                    f"{self.val_loss} is {float(loss)}" if loss_bad else
                    "a non-finite value on another process")
            raise NonFiniteLossError(
                f"{what} {when} of epoch {trainer.current_epoch}; the run stopped before saving "
                "that state (lower optim.lr, add warm-up, or use precision 32-true)")

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, module, "after validation")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._check(trainer, module, "at the end")


def resume_notes(resume: Path | None, asked: dict[str, Any]) -> list[str]:
    """:func:`check_resume` of the config stored in the checkpoint ``resume`` (if any)."""
    from attnconv.weights import safe_load

    if resume is None:
        return []
    stored = (safe_load(resume).get("attnconv") or {}).get("config")
    return check_resume(stored, asked) if isinstance(stored, dict) else []


def stopped_note(run_dir: Path) -> str:
    """What a stopped run leaves: the last checkpoint and its epoch, or that there is none."""
    from attnconv.weights import safe_load

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "no checkpoint was written (the run stopped in its first epoch)"
    epoch = safe_load(last).get("epoch")
    return f"the last good checkpoint is {last} (epoch {epoch}, counting from 0)"


def is_global_zero() -> bool:
    """Whether this process reports a run's results: the only process, or global rank 0 of a
    distributed run (Lightning's rank: torchrun's environment, then the trainer's)."""
    return rank_zero_only.rank == 0


def check_devices(t: TrainerConfig) -> None:
    """ConfigError when ``t`` asks for a GPU this machine lacks, or for more GPUs than it has
    (instead of Lightning starting that many CPU processes under ``accelerator: auto``); the
    refusal says how to run on the CPU instead."""
    devices = parse_devices(t.devices)
    wanted = len(devices) if isinstance(devices, list) else devices
    if t.accelerator == "cpu":
        return
    count = wanted if isinstance(wanted, int) else 0  # 'auto', -1: as many as there are
    needed = max(count, 1) if t.accelerator in ("gpu", "cuda") else count
    found = torch.cuda.device_count()
    if found >= needed or (t.accelerator == "auto" and needed <= 1):
        return
    asked, cpu = ((f"trainer.devices {t.devices}", f"for {count} CPU processes") if count > 1
                  else (f"trainer.accelerator {t.accelerator}", "to train on the CPU"))
    raise ConfigError(f"{asked}: this machine has {found} GPU{'s' * (found != 1)} "
                      f"(torch.cuda.device_count()); {cpu} say --trainer.accelerator cpu")


def prepare_run_dir(run_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """A run folder belongs to one run and its resumes: an earlier run's folder is refused
    (ConfigError) unless ``overwrite`` (then it is emptied, by the first process only)."""
    import os
    import shutil

    earlier = run_dir.is_dir() and any(
        (run_dir / name).exists() for name in ("checkpoints", "logs", "detector.pt"))
    if resuming or not earlier:
        return
    if not overwrite:
        raise ConfigError(f"run folder {run_dir} holds an earlier run: pass --resume last to "
                          "continue it, --overwrite true to replace it, or another --name")
    if os.environ.get("RANK", "0") == "0":
        for child in run_dir.iterdir():
            if child.name != "data":  # generated data (detection) is the run's input
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "model_args":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


#: Options a resume applies (they change how the rest of the run is run or shown, not what it
#: computes); every other changed option is refused.
RESUME_APPLIES = frozenset({
    "resume", "overwrite", "out_dir", "name", "trainer.max_epochs", "trainer.max_steps",
    "trainer.progress_bar", "trainer.log_every_n_steps", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.accelerator", "data.num_workers", "data.root", "data.download",
})


def check_resume(stored: dict[str, Any], asked: dict[str, Any],
                 applies: frozenset[str] = RESUME_APPLIES) -> list[str]:
    """The changed options a resume applies (as ``key: old -> new`` lines); ConfigError naming
    every other option that differs from the checkpoint's run (a resumed run continues the
    stored optimizer, schedule and data order: changing them would record a run that never
    happened)."""
    old, new = _flat(stored), _flat(asked)
    changed = {k: (old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]}
    refused = sorted(k for k in changed if k not in applies)
    if refused:
        parts = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ConfigError(f"--resume continues the checkpoint's run, which had other settings: "
                          f"{parts}; drop these options, or start a new run")
    return [f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in sorted(changed)
            if k not in ("resume", "overwrite")]


def parse_devices(devices: str) -> int | str | list[int]:
    """``'4'`` -> 4, ``'0,1'`` -> [0, 1], ``'auto'`` -> ``'auto'`` (Lightning's forms)."""
    text = str(devices).strip()
    if text.isdigit():
        return int(text)
    if "," in text:
        try:
            return [int(d) for d in text.split(",") if d.strip()]
        except ValueError as err:
            raise ConfigError(f"trainer.devices must be a count, a list such as '0,1', or "
                              f"auto, not {devices!r}") from err
    if text == "auto" or text == "-1":
        return text if text == "auto" else -1
    raise ConfigError(f"trainer.devices must be a count, a list such as '0,1', or auto, "
                      f"not {devices!r}")


def resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names (``'last'``: ``RUN/checkpoints/last.ckpt``)."""
    if not resume:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    return path


def _csv_version(run_dir: Path, resuming: bool) -> str:
    # CSVLogger empties a folder it reuses: a resumed run writes next to the earlier part.
    if not resuming:
        return "logs"
    n = 1
    while (run_dir / f"logs-{n}").exists():
        n += 1
    return f"logs-{n}"


def make_trainer(
    t: TrainerConfig,
    run_dir: Path,
    *,
    monitor: str | None = None,
    mode: str = "max",
    val_loss: str | None = None,
    callbacks: Sequence[L.Callback] = (),
    loggers: bool = True,
    tensorboard: bool = True,
    resuming: bool = False,
) -> L.Trainer:
    """A Trainer for ``t`` writing into ``run_dir``.

    With ``monitor``, checkpoints go to ``RUN/checkpoints``: ``best.ckpt`` (the best
    ``monitor``) and ``last.ckpt``, written atomically and read weights-only
    (:class:`SafeCheckpointIO`), with the RNG state for an exact resume. ``last.ckpt`` is
    the end of the last epoch, improved or not. :class:`FiniteGuard` stops the run before a
    state with non-finite weights (or a non-finite ``val_loss`` metric) is saved.
    """
    all_callbacks: list[L.Callback] = [RNGState(), FiniteGuard(val_loss), *callbacks]
    if monitor is not None:
        folder = run_dir / "checkpoints"
        all_callbacks[:0] = [
            ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor, mode=mode,
                            save_top_k=1, every_n_epochs=1, auto_insert_metric_name=False,
                            enable_version_counter=False),
            # Lightning's save_last writes only when the top-k save happens, so its last.ckpt
            # would be the last *improving* epoch: a monitor-less callback saves every epoch.
            ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                            every_n_epochs=1, auto_insert_metric_name=False,
                            enable_version_counter=False),
        ]
    if t.progress_bar:
        all_callbacks.append(EpochBars())  # one bar kept per epoch, on stderr
    elif not any(isinstance(c, RunProgress) for c in callbacks):
        all_callbacks.append(RunBar(run_dir.name))  # a task that drew no job bar gets one
    logger: Any = False
    if loggers:
        logger = [CSVLogger(run_dir, name="", version=_csv_version(run_dir, resuming))]
        if tensorboard:
            logger.append(TensorBoardLogger(run_dir, name="", version="tensorboard"))
    return _trainer(
        default_root_dir=run_dir, max_epochs=t.max_epochs, max_steps=t.max_steps,
        accelerator=t.accelerator, devices=parse_devices(t.devices), num_nodes=t.num_nodes,
        strategy=t.strategy, precision=t.precision, deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps, check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
        # The sanity check would draw random numbers a resumed run must not draw.
        num_sanity_val_steps=0,
        enable_checkpointing=monitor is not None,
        callbacks=all_callbacks, plugins=[SafeCheckpointIO()], logger=logger,
    )


def _trainer(**kwargs: Any) -> L.Trainer:
    """``L.Trainer(**kwargs)``; Lightning's refusal of an option (accelerator, devices,
    strategy, precision, batch limits) is a ConfigError, so the command line says it in one
    line instead of a traceback."""
    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, ImportError) as err:
        raise ConfigError(f"Lightning refused the trainer options: {err}") from err


def evaluation_trainer(accelerator: str = "auto") -> L.Trainer:
    """A one-device Trainer for ``validate`` that writes nothing."""
    return _trainer(accelerator=accelerator, devices=1, logger=False,
                    enable_model_summary=False, enable_progress_bar=False,
                    enable_checkpointing=False)
