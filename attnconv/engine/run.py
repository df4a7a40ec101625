"""The one run template of every task: :func:`fit` checks the config, holds the run folder,
builds the trainer, then the data, the network and the module through the task's hooks
(:class:`Task`), trains, and hands what was saved to the task's :meth:`Task.finish`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import lightning as L

from attnconv.engine.config import RunConfig
from attnconv.engine.progress import JobProgress
from attnconv.engine.trainer import (
    NonFiniteLossError,
    SavedEpoch,
    claim_run_dir,
    make_trainer,
    quiet_lightning,
    resume_notes,
    resume_path,
    run_dir_path,
    saved_epochs,
    stopped_note,
)

C = TypeVar("C", bound=RunConfig)
R = TypeVar("R")


@dataclass
class Fitted:
    """A trained run: its trainer, module and folder, the data the task built, the last and
    best checkpoints (None where none was written) and the seconds ``fit`` took."""

    trainer: L.Trainer
    module: L.LightningModule
    run_dir: Path
    data: Any
    last: SavedEpoch | None
    best: SavedEpoch | None
    seconds: float


class Task(Generic[C, R]):
    """What a task hands :func:`fit`: its checkpoint metric and its hooks, over one config.

    ``data`` builds the datasets (in the run folder, for data a run generates); the global
    generators are seeded after it, so that ``module`` draws the network's initial weights
    from the seed alone.
    """

    #: The validation metric the best checkpoint is chosen by (higher is better).
    monitor: str = ""
    #: The logged validation loss that must stay finite (None: the task logs none).
    val_loss: str | None = None
    #: Whether the run writes TensorBoard logs beside the CSV ones.
    tensorboard: bool = True

    def __init__(self, config: C) -> None:
        self.config = config

    @property
    def title(self) -> str:
        """The job bar's title, e.g. ``train resnet18``."""
        return f"{self.config.command} {self.config.model}"

    def callbacks(self) -> list[L.Callback]:
        """The task's own callbacks."""
        return []

    def data(self, run_dir: Path) -> Any:
        raise NotImplementedError

    def module(self, data: Any, load_init: bool) -> tuple[L.LightningModule, str]:
        """The module to train on ``data`` and the model table printed before training ('':
        none); the network starts from ``config.init`` with ``load_init`` (a resumed run's
        checkpoint holds its weights)."""
        raise NotImplementedError

    def loaders(self, data: Any) -> dict[str, Any]:
        """``Trainer.fit``'s data arguments (``datamodule``, or the two data loaders)."""
        raise NotImplementedError

    def finish(self, fitted: Fitted) -> R:
        """The task's result of the trained run (written while the run folder is held)."""
        raise NotImplementedError


def fit(task: Task[C, R], callbacks: Sequence[L.Callback] = (),
        progress: JobProgress | None = None, *, checked: bool = False) -> R:
    """Train the run ``task.config`` describes; checkpoints and logs go to its run folder.

    ``progress``: the bar of a larger job this run is part of; without it the run prints its
    model table and draws its own bar. ``checked``: the caller ran ``config.check()`` (a job
    checks all its runs before the first one starts). Bad input (options, data, resume path)
    raises before any training step, and a run that stops before its first checkpoint leaves
    the run folder as it found it.
    """
    cfg = task.config
    quiet_lightning()
    if not checked:
        cfg.check()
    run_dir = run_dir_path(cfg.out_dir, cfg.run_name)
    resume = resume_path(cfg.resume, run_dir)
    for note in resume_notes(resume, cfg):
        print(f"resume: applying {note}")
    job = progress or JobProgress(task.title, detail=cfg.trainer.progress_bar)
    with claim_run_dir(run_dir, cfg, resuming=resume is not None):
        try:
            trainer = make_trainer(
                cfg.trainer, run_dir, monitor=task.monitor, mode="max", val_loss=task.val_loss,
                callbacks=[*task.callbacks(), job.callback(f"{cfg.model} s{cfg.seed}"),
                           *callbacks],
                tensorboard=task.tensorboard, resuming=resume is not None)
            data = task.data(run_dir)
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            module, table = task.module(data, load_init=resume is None)
            loaders = task.loaders(data)
            if progress is None and table:
                job.write(table)
            job.bar.refresh()  # the run is accepted: the bar shows from here
            start = time.perf_counter()
            try:
                trainer.fit(module, **loaders, ckpt_path=resume)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err}; {stopped_note(run_dir)}") from None
            seconds = time.perf_counter() - start
        finally:
            if progress is None:
                job.close()
        last, best = saved_epochs(trainer, run_dir, task.monitor)
        return task.finish(Fitted(trainer, module, run_dir, data, last, best, seconds))
