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
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from attnconv.engine.config import ConfigError, TrainerConfig
from attnconv.training.callbacks import RNGState
from attnconv.training.checkpoint import SafeCheckpointIO


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the weights of that step are not applied."""


def quiet_lightning() -> None:
    """Keep Lightning's start-up notices and small-data warnings out of the user's output."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*LeafSpec.*", ".*isinstance.*treespec.*"):
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
    callbacks: Sequence[L.Callback] = (),
    loggers: bool = True,
    tensorboard: bool = True,
    resuming: bool = False,
) -> L.Trainer:
    """A Trainer for ``t`` writing into ``run_dir``.

    With ``monitor``, checkpoints go to ``RUN/checkpoints``: ``best.ckpt`` (the best
    ``monitor``) and ``last.ckpt``, written atomically and read weights-only
    (:class:`SafeCheckpointIO`), with the RNG state for an exact resume.
    """
    all_callbacks: list[L.Callback] = [RNGState(), *callbacks]
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
        all_callbacks.append(TQDMProgressBar(leave=True))  # one bar kept per epoch
    logger: Any = False
    if loggers:
        logger = [CSVLogger(run_dir, name="", version=_csv_version(run_dir, resuming))]
        if tensorboard:
            logger.append(TensorBoardLogger(run_dir, name="", version="tensorboard"))
    return L.Trainer(
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


def evaluation_trainer(accelerator: str = "auto") -> L.Trainer:
    """A one-device Trainer for ``validate`` that writes nothing."""
    return L.Trainer(accelerator=accelerator, devices=1, logger=False,
                     enable_model_summary=False, enable_progress_bar=False,
                     enable_checkpointing=False)
