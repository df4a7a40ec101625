"""The Lightning pieces every task shares: trainer construction, quiet logging, the DDP-safe
non-finite stop, atomic weights-only checkpoints and resume."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from attnconv.engine.callbacks import RNGState
from attnconv.engine.checkpoint import SafeCheckpointIO
from attnconv.engine.config import ConfigError, RunConfig, TrainerConfig, parse_devices
from attnconv.engine.progress import EpochBars, RunBar, RunProgress


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the weights of that step are not applied."""


def quiet_lightning() -> None:
    """Keep Lightning's start-up notices and small-data warnings out of the user's output."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*LeafSpec.*", ".*isinstance.*treespec.*",
                    # A resume writes into its own run's folder (check_run_dir refuses others).
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


def resume_notes(resume: Path | None, config: RunConfig) -> list[str]:
    """:func:`check_resume` of the config stored in the checkpoint ``resume`` (if any)."""
    from attnconv.weights import safe_load

    if resume is None:
        return []
    stored = (safe_load(resume).get("attnconv") or {}).get("config")
    return (check_resume(stored, config.to_dict(), config.resumable())
            if isinstance(stored, dict) else [])


def stopped_note(run_dir: Path) -> str:
    """What a stopped run leaves: the last checkpoint and its epoch, or that there is none."""
    from attnconv.weights import safe_load

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return "no checkpoint was written (the run stopped in its first epoch)"
    epoch = safe_load(last).get("epoch")
    return f"the last good checkpoint is {last} (epoch {epoch}, counting from 0)"


@dataclass
class SavedEpoch:
    """A checkpoint a run wrote: its file, the epoch it ends (counting from 0) and its score
    (the monitored validation metric)."""

    path: Path
    epoch: int
    score: float | None = None

    @classmethod
    def read(cls, path: Path, score: Any = None) -> SavedEpoch | None:
        from attnconv.weights import safe_load

        if not path.is_file():
            return None
        return cls(path, int(safe_load(path)["epoch"]),
                   None if score is None else float(score))


def result_note(last: SavedEpoch | None, best: SavedEpoch | None, max_epochs: int,
                metric: str, scale: float = 1.0) -> str:
    """Which epoch the figures of a finished run are from (the last one's: ``last``), and the
    best epoch's ``metric`` and file when that is another epoch."""
    if last is None:
        return "no checkpoint was written"
    text = f"figures of epoch {last.epoch + 1}/{max_epochs} (the last), {last.path}"
    if best is not None and best.epoch != last.epoch and best.score is not None:
        text += (f"; the best epoch was {best.epoch + 1}/{max_epochs} ({metric} "
                 f"{best.score * scale:.2f}), {best.path}")
    elif best is not None:
        text += f"; it is also the best epoch ({best.path})"
    return text


def saved_epochs(trainer: L.Trainer, run_dir: Path, monitor: str
                 ) -> tuple[SavedEpoch | None, SavedEpoch | None]:
    """The last and the best checkpoint of a finished run (None where none was written); the
    last one's score is the last validation's ``monitor``."""
    folder = run_dir / "checkpoints"
    best = trainer.checkpoint_callback
    return (SavedEpoch.read(folder / "last.ckpt", trainer.callback_metrics.get(monitor)),
            SavedEpoch.read(folder / "best.ckpt",
                            best.best_model_score if best is not None else None))


def is_global_zero() -> bool:
    """Whether this process reports a run's results: the only process, or global rank 0 of a
    distributed run (Lightning's rank: torchrun's environment, then the trainer's)."""
    return rank_zero_only.rank == 0


def check_devices(t: TrainerConfig) -> int | str | list[int]:
    """``t.devices`` in Lightning's form (:func:`parse_devices`); ConfigError when ``t`` asks
    for a GPU this machine lacks, or for more GPUs than it has (instead of Lightning starting
    that many CPU processes under ``accelerator: auto``); the refusal says how to run on the
    CPU instead."""
    devices = parse_devices(t.devices)
    wanted = len(devices) if isinstance(devices, list) else devices
    if t.accelerator == "cpu":
        return devices
    count = wanted if isinstance(wanted, int) else 0  # 'auto', -1: as many as there are
    needed = max(count, 1) if t.accelerator in ("gpu", "cuda") else count
    found = torch.cuda.device_count()
    if found >= needed or (t.accelerator == "auto" and needed <= 1):
        return devices
    asked, cpu = ((f"trainer.devices {t.devices}", f"for {count} CPU processes") if count > 1
                  else (f"trainer.accelerator {t.accelerator}", "to train on the CPU"))
    raise ConfigError(f"{asked}: this machine has {found} GPU{'s' * (found != 1)} "
                      f"(torch.cuda.device_count()); {cpu} say --trainer.accelerator cpu")


LOCK_FILE = ".lock"
#: What every run writes into its folder (and ``logs-N``, the logs of resumed parts), beside
#: its task's own files (:attr:`RunConfig.run_files`, :attr:`RunConfig.run_inputs`); a folder
#: holding anything else is not a run's, and no run starts in it.
RUN_ENTRIES = frozenset({"checkpoints", "logs", "tensorboard", LOCK_FILE})


def run_dir_path(out_dir: str | Path, name: str) -> Path:
    """``OUT_DIR/NAME``; ConfigError unless ``name`` is a plain folder name (not empty, ``.``,
    ``..``, absolute or a path) and ``out_dir`` is a folder or does not exist yet."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name
            or Path(name).is_absolute()):
        raise ConfigError(f"name must be a plain folder name, created inside out_dir (no '/', "
                          f"'.' or '..'), not {name!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder")
    return out / name


def _is_run_entry(name: str, config: RunConfig) -> bool:
    # ``.NAME.PID.XXXX.tmp``: an atomic write in progress or abandoned by a killed run.
    return (name in RUN_ENTRIES or name in config.run_files or name in config.run_inputs
            or (name.startswith("logs-") and name[5:].isdigit())
            or (name.startswith(".") and name.endswith(".tmp")))


def _check_not_foreign(run_dir: Path, config: RunConfig, resuming: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file: choose another --name")
    if resuming or not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not _is_run_entry(p.name, config))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        raise ConfigError(f"run folder {run_dir} holds files that are not a run's ({shown}): "
                          "a run starts only in a new folder or in its own; choose another "
                          "--name or --out_dir")


def check_run_dir(run_dir: Path, config: RunConfig, *, resuming: bool,
                  can_resume: bool = True) -> None:
    """ConfigError when the run ``config`` describes may not start in ``run_dir``: it is a
    file, it holds anything that is not a run's (never emptied, whatever ``config.overwrite``
    says), or it holds an earlier run and the run neither resumes nor overwrites it. The
    message suggests ``--resume last`` only where it would work: the command has it
    (``can_resume``), there is a last checkpoint, and its run had the settings of ``config``
    where a resume needs them. A folder in use by another run (:func:`claim_run_dir`) is
    refused as such."""
    _check_not_foreign(run_dir, config, resuming)
    if _first_process() and (run_dir / LOCK_FILE).is_file():
        _lock(run_dir).close()
    _check_no_earlier(run_dir, config, resuming, can_resume)


def _check_no_earlier(run_dir: Path, config: RunConfig, resuming: bool,
                      can_resume: bool) -> None:
    if resuming or not run_dir.is_dir():
        return
    earlier = any((run_dir / name).exists()
                  for name in ("checkpoints", "logs", *sorted(config.run_files)))
    if earlier and not config.overwrite:
        last = run_dir / "checkpoints" / "last.ckpt"
        hint = "pass --overwrite true to replace it, or another --name"
        if can_resume and last.is_file():
            from attnconv.weights import safe_load

            stored = (safe_load(last).get("attnconv") or {}).get("config")
            other = (_refused_text(_changes(stored, config.to_dict()), config.resumable())
                     if isinstance(stored, dict) else "")
            hint = (f"it ran with other settings ({other}), so it cannot be resumed with these; "
                    f"{hint}" if other else "pass --resume last to continue it, --overwrite true "
                    "to replace it, or another --name")
        raise ConfigError(f"run folder {run_dir} holds an earlier run: {hint}")


def _first_process() -> bool:
    # Under torchrun or Lightning's launcher only one process owns the run folder.
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _lock(run_dir: Path) -> Any:
    """The open, exclusively locked lock file of ``run_dir`` (ConfigError when another run
    holds it). flock locks go with the process: a killed run leaves no stale lock."""
    handle = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 -- held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise ConfigError(f"run folder {run_dir} is in use by another run"
                          f"{f' (process {owner})' if owner.isdigit() else ''}: wait for it to "
                          "end, or choose another --name") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _remove_created(created: list[Path]) -> None:
    """Remove the run folder ``created[0]`` and, while they are empty, the folders above it
    that were created with it (another run may have started in a new out_dir meanwhile)."""
    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, config: RunConfig, *, resuming: bool) -> Iterator[Path]:
    """Hold ``run_dir`` for the run ``config`` describes: :func:`check_run_dir`, then (first
    process only) an exclusive lock for the run's whole length and, with ``config.overwrite``,
    the earlier run's files removed (what the task generates as the run's input,
    ``config.run_inputs``, stays).

    A run that ends in an error before it wrote a checkpoint (a refusal while its data is
    read, a stop in its first epoch) leaves the folder as it found it: what it added is
    removed, so the corrected command starts again in the same folder.
    """
    if not _first_process():
        check_run_dir(run_dir, config, resuming=resuming)
        yield run_dir
        return
    _check_not_foreign(run_dir, config, resuming)
    # The folders this run creates (the run folder, and out_dir when it is new).
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = _lock(run_dir)
    except ConfigError:
        _remove_created(created)
        raise
    try:
        _check_no_earlier(run_dir, config, resuming, can_resume=True)
        if config.overwrite and not resuming:
            for child in run_dir.iterdir():
                if child.name not in config.run_inputs and child.name != LOCK_FILE:
                    _remove(child)
        before = {p.name for p in run_dir.iterdir()}
        start = time.time()
        try:
            yield run_dir
        except BaseException:
            saved = any(p.stat().st_mtime >= start
                        for p in (run_dir / "checkpoints").glob("*.ckpt"))
            if not saved:
                if created:
                    _remove_created(created)
                else:
                    for child in run_dir.iterdir():
                        if child.name not in before:
                            _remove(child)
            raise
    finally:
        lock.close()


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "model_args":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(stored: dict[str, Any], asked: dict[str, Any],
                 applies: frozenset[str]) -> list[str]:
    """The changed options a resume applies (those in ``applies``, as ``key: old -> new``
    lines); ConfigError naming every other option that differs from the checkpoint's run (a
    resumed run continues the
    stored optimizer, schedule and data order: changing them would record a run that never
    happened)."""
    changed = _changes(stored, asked)
    refused = _refused_text(changed, applies)
    if refused:
        raise ConfigError(f"--resume continues the checkpoint's run, which had other settings: "
                          f"{refused}; drop these options, or start a new run")
    return [f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in sorted(changed)
            if k not in ("resume", "overwrite")]


def _changes(stored: dict[str, Any], asked: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    old, new = _flat(stored), _flat(asked)
    return {k: (old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k]}


def _refused_text(changed: dict[str, tuple[Any, Any]], applies: frozenset[str]) -> str:
    """``key old -> new`` of the changes a resume cannot apply ('' when there are none)."""
    return ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}"
                     for k in sorted(changed) if k not in applies)



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
    """A Trainer for ``t`` writing into ``run_dir`` (ConfigError for devices this machine
    lacks, :func:`check_devices`, and for options Lightning refuses).


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
    # The section's fields are named as Lightning's arguments, but for the progress bar.
    section = dataclasses.asdict(t)
    section["enable_progress_bar"] = section.pop("progress_bar")
    section["devices"] = check_devices(t)
    return _trainer(
        **section, default_root_dir=run_dir, enable_model_summary=False,
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
