"""What every task (classification, detection, segmentation) shares; nothing here imports a
task.

* :mod:`attnconv.engine.config` -- typed dataclass configs, the run fields every task has
  (:class:`RunConfig`), recipes, ``--section.key value`` options, :class:`ConfigError` (no
  Lightning import).
* :mod:`attnconv.engine.run` -- the one run template (:func:`~attnconv.engine.run.fit`) over a
  task's hooks (:class:`~attnconv.engine.run.Task`).
* :mod:`attnconv.engine.trainer` -- Lightning trainer construction, quiet logging, the DDP-safe
  non-finite stop, run folders, resume.
* :mod:`attnconv.engine.schedule` -- the one learning-rate schedule (warm-up, multistep,
  cosine), in epochs; tasks step it per epoch or per iteration.
* :mod:`attnconv.engine.checkpoint`, :mod:`attnconv.engine.callbacks` -- atomic weights-only
  checkpoint I/O, RNG state in checkpoints, throughput.

A task is a config (a :class:`RunConfig` with its ``data`` and ``optim`` sections, stating
the resume keys and run-folder files that are its own), a LightningModule, and a
:class:`~attnconv.engine.run.Task` whose hooks build its data and module and report its
result.
"""

from attnconv.engine.config import ConfigError, RunConfig, TrainerConfig, apply, load_recipe

__all__ = ["ConfigError", "RunConfig", "TrainerConfig", "apply", "load_recipe"]
