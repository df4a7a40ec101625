"""What every task (classification, detection, ...) shares.

* :mod:`attnconv.engine.config` -- typed dataclass configs, recipes, ``--section.key value``
  options, :class:`ConfigError` (no Lightning import).
* :mod:`attnconv.engine.trainer` -- Lightning trainer construction, quiet logging, the DDP-safe
  non-finite stop, run folders, resume.
* :mod:`attnconv.engine.schedule` -- the one learning-rate schedule (warm-up, multistep,
  cosine), in epochs; tasks step it per epoch or per iteration.
* :mod:`attnconv.engine.checkpoint`, :mod:`attnconv.engine.callbacks` -- atomic weights-only
  checkpoint I/O, RNG state in checkpoints, throughput.

A task is a config dataclass (sections over :class:`TrainerConfig`), a LightningModule and a
``train``/``evaluate`` pair of functions that call :func:`make_trainer`.
"""

from attnconv.engine.config import ConfigError, TrainerConfig, apply, load_recipe

__all__ = ["ConfigError", "TrainerConfig", "apply", "load_recipe"]
