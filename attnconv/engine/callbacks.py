"""Callbacks that Lightning does not provide: RNG state in checkpoints, and throughput."""

from __future__ import annotations

import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch


class RNGState(L.Callback):
    """Saves and restores the Python, NumPy, torch and CUDA generators with each checkpoint,
    so that a resumed run draws the same data order and augmentations as one never stopped.

    The NumPy state goes in as a tensor: ``torch.load(weights_only=True)`` refuses arrays.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class Throughput(L.Callback):
    """Training images per second over each epoch (all processes), logged as train_img_per_s."""

    def __init__(self) -> None:
        self.images = 0
        self.start = 0.0
        self.last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.images, self.start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self.images += len(batch[0])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self.start
        self.last = self.images * trainer.world_size / max(seconds, 1e-9)
        module.log("train_img_per_s", self.last, on_epoch=True)
