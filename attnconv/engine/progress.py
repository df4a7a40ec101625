"""One progress bar for a whole job (``attnconv train``, ``compare``, ``demo``, ``train-det``):
runs done / to do, elapsed time and an estimate of the rest, on stderr from the job's start.

Lightning's per-epoch bars are the detail behind ``trainer.progress_bar`` (``--progress`` for
the demo); with them on, the job bar gives way to one line per run, because two live tqdm
bars at once overwrite each other. ``TQDM_DISABLE=1`` in the environment hides the bar (tqdm
reads its options from ``TQDM_*`` variables).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import IO, Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.auto import tqdm


def _rank_zero() -> bool:
    # Under torchrun every process runs the job; only the first one draws.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _clock(seconds: float) -> str:
    return tqdm.format_interval(max(0.0, seconds))


class JobProgress:
    """The bar of one job of ``runs`` training runs.

    The bar counts optimizer steps over the whole job (the first run tells how many a run
    has), so its estimate comes from the steps done so far, validation time included. Its
    label says how many runs are done: ``compare 1/6 runs``. Use as a context manager (or call
    :meth:`close`) so that the bar ends before the result tables are printed.
    """

    def __init__(self, title: str, runs: int = 1, *, detail: bool = False,
                 file: IO[str] | None = None) -> None:
        self.title, self.runs, self.detail = title, runs, detail
        self.done = 0
        self.main = _rank_zero()
        self.file = file or sys.stderr
        self.start = time.perf_counter()
        self._last_step = 0
        self._last_refresh = 0.0
        self._bar: tqdm | None = None

    @property
    def bar(self) -> tqdm:
        """The bar, drawn on first use: a run refused while it is being set up (a trainer
        option Lightning rejects) leaves stderr to its one-line message."""
        if self._bar is None:
            self._bar = tqdm(total=None, desc=self._desc(), unit="step", file=self.file,
                             smoothing=0, dynamic_ncols=True,
                             **({"disable": True} if self.detail or not self.main else {}))
        return self._bar

    def _desc(self) -> str:
        return f"{self.title} {self.done}/{self.runs} runs" if self.runs > 1 else self.title

    def __enter__(self) -> JobProgress:
        self.bar.refresh()  # a job's bar shows from its first second
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def write(self, text: str, file: IO[str] | None = None) -> None:
        """Print ``text`` (stdout by default) above the bar, from the first process only."""
        if self.main:
            tqdm.write(text, file=file or sys.stdout)  # above the bar, if one is drawn
            (file or sys.stdout).flush()

    def status(self, text: str) -> None:
        """What the job does now, after the bar's figures (e.g. ``validating``)."""
        self.bar.set_postfix_str(text, refresh=False)
        now = time.perf_counter()
        if now - self._last_refresh > 0.2:  # a terminal write per batch would cost time
            self._last_refresh = now
            self.bar.refresh()

    def begin_run(self, label: str, steps: float, done_steps: int = 0) -> None:
        """A run of ``steps`` optimizer steps (``done_steps`` of them done: a resume) starts."""
        self._last_step = done_steps
        if steps != float("inf"):
            left = max(0, int(steps) - done_steps) + int(steps) * (self.runs - self.done - 1)
            self.bar.total = self.bar.n + left
        if self.detail and self.runs > 1 and self.main:
            elapsed = time.perf_counter() - self.start
            eta = (f", about {_clock(elapsed / self.done * (self.runs - self.done))} left"
                   if self.done else "")
            self.bar.write(f"{self.title}: run {self.done + 1}/{self.runs} ({label}), "
                           f"{_clock(elapsed)} elapsed{eta}", file=self.file)
        self.status(label)

    def advance(self, global_step: int) -> None:
        """The run's optimizer step count is now ``global_step``."""
        if global_step > self._last_step:
            self.bar.update(global_step - self._last_step)
            self._last_step = global_step

    def end_run(self) -> None:
        self.done += 1
        self.bar.set_postfix_str("", refresh=False)
        self.bar.set_description_str(self._desc(), refresh=True)

    def callback(self, label: str) -> L.Callback:
        """The Lightning callback that moves this bar during the run called ``label``."""
        return RunProgress(self, label)


class RunProgress(L.Callback):
    """Moves a :class:`JobProgress` bar through one run: steps, epoch, validation, done."""

    def __init__(self, job: JobProgress, label: str) -> None:
        self.job, self.label = job, label

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.job.begin_run(self.label, trainer.estimated_stepping_batches,
                               trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.job.status(f"{self.label} epoch {trainer.current_epoch + 1}/"
                            f"{trainer.max_epochs}")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any
                           ) -> None:
        if trainer.is_global_zero:
            self.job.advance(trainer.global_step)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self.job.status(f"{self.label} epoch {trainer.current_epoch + 1}/"
                            f"{trainer.max_epochs} validating")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.job.end_run()


class RunBar(RunProgress):
    """The job bar of a run that no larger job drew one for (:func:`make_trainer` adds it
    when its caller passed no :meth:`JobProgress.callback`): it opens when fitting starts and
    closes when fitting ends or fails."""

    def __init__(self, title: str) -> None:
        self.title, self.label = title, title

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.job = JobProgress(self.title, detail=not trainer.is_global_zero)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.job.close()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule,
                     exception: BaseException) -> None:
        if hasattr(self, "job"):
            self.job.close()


class EpochBars(TQDMProgressBar):
    """Lightning's per-epoch bars (one kept per epoch), drawn on stderr like the job bar:
    Lightning draws on stdout, where they would mix with the result tables."""

    def __init__(self) -> None:
        super().__init__(leave=True)

    def _on_stderr(self, make: Any) -> Any:
        with contextlib.redirect_stdout(sys.stderr):  # Lightning passes file=sys.stdout
            return make()

    def init_sanity_tqdm(self) -> Any:
        return self._on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Any:
        return self._on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Any:
        return self._on_stderr(super().init_validation_tqdm)

    def init_predict_tqdm(self) -> Any:
        return self._on_stderr(super().init_predict_tqdm)

    def init_test_tqdm(self) -> Any:
        return self._on_stderr(super().init_test_tqdm)
