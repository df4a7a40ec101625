"""One learning-rate schedule for every task, in epochs (a float: step / steps per epoch).

Linear warm-up from ``warmup_start`` to 1 over ``warmup_epochs``, then multistep (x ``gamma``
at each milestone epoch), cosine (to 0 at ``max_epochs``, counted from the warm-up's end) or
constant. Classification steps it once per epoch (the papers' recipes are stated per epoch);
detection once per optimizer step (Detectron's warm-up is 500 iterations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULERS = ("multistep", "cosine", "constant")


def lr_factor(epoch: float, *, scheduler: str = "multistep", milestones: Sequence[float] = (),
              gamma: float = 0.1, max_epochs: int = 1, warmup_epochs: float = 0.0,
              warmup_start: float | None = None) -> float:
    """Multiplier of the base lr at ``epoch`` (0-based, fractional within an epoch).

    ``warmup_start`` is the factor at epoch 0 (default ``1 / (warmup_epochs + 1)``, so that
    epoch ``e`` of an epoch-wise warm-up has ``(e + 1) / (warmup_epochs + 1)``).
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler '{scheduler}' (known: {', '.join(SCHEDULERS)})")
    if epoch < warmup_epochs:
        start = 1 / (warmup_epochs + 1) if warmup_start is None else warmup_start
        alpha = epoch / warmup_epochs
        ramp = start * (1 - alpha) + alpha
        # Milestones inside the warm-up still apply (Detectron's rule).
        return ramp * (gamma ** sum(epoch >= m for m in milestones)
                       if scheduler == "multistep" else 1.0)
    if scheduler == "multistep":
        return gamma ** sum(epoch >= m for m in milestones)
    if scheduler == "cosine":
        span = max(1e-12, max_epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup_epochs) / span)))
    return 1.0
