"""What ``attnconv demo`` runs: the training comparison of a plain, an AW and an RFA ResNet-18
on the embedded digits, with the shipped ``demo`` recipe (``attnconv/recipes/demo.yaml``), and
the training speed of the three measured side by side."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from attnconv.analysis.profiling import median_times
from attnconv.classification.config import ClassificationConfig
from attnconv.engine.config import apply, load_recipe
from attnconv.engine.tables import markdown_table

if TYPE_CHECKING:
    from attnconv.classification.data import Datasets

#: The three variants of a narrow CIFAR-stem ResNet-18 the demo compares.
DEMO_MODELS = ("resnet18", "resnet18_aw", "resnet18_rfa")


def demo_config(out_dir: str = "runs/demo", progress_bar: bool = False,
                max_epochs: int | None = None) -> ClassificationConfig:
    """The config of ``attnconv demo``: the shipped ``demo`` recipe, writing to
    ``OUT_DIR/compare`` (a demo run replaces the previous one)."""
    values: dict = {"out_dir": out_dir, "name": "compare", "overwrite": True,
                    "trainer": {"progress_bar": progress_bar}}
    if max_epochs is not None:
        values["trainer"]["max_epochs"] = max_epochs
    return apply(load_recipe("demo", ClassificationConfig), values, where="demo options")


def _train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def train_throughput(models: dict[str, nn.Module], images: torch.Tensor,
                     targets: torch.Tensor, rounds: int = 5) -> dict[str, float]:
    """Training images per second of each model (forward, cross-entropy, backward and an SGD
    step on the batch ``images``): the median of ``rounds`` rounds in which every model takes
    one step in turn, in this process, so that other work on the machine slows them alike.
    Runs timed one after another can rank the models the wrong way round on a busy machine."""
    steps = {name: _train_step(model, images, targets) for name, model in models.items()}
    seconds = median_times(steps, repeats=rounds, warmup=1)
    return {name: len(images) / seconds[name] for name in models}


def throughput_report(names: Sequence[str], cfg: ClassificationConfig, sets: Datasets,
                      rounds: int = 5) -> str:
    """:func:`train_throughput` of the models ``names`` as ``cfg`` builds them for ``sets``, on
    one random batch of ``cfg``'s batch size and the data's image size, as a table with each
    model's ratio to the first, headed by the machine's load average (1 minute) before and
    after."""
    from attnconv.classification.models import build_model

    torch.manual_seed(0)
    batch = cfg.data.batch_size
    images = torch.randn(batch, sets.in_chans, sets.image_size, sets.image_size)
    targets = torch.randint(0, sets.num_classes, (batch,))
    models = {name: build_model(name, sets.num_classes, sets.in_chans, **cfg.model_args)
              for name in names}
    before = os.getloadavg()[0]
    speed = train_throughput(models, images, targets, rounds)
    after = os.getloadavg()[0]
    first = speed[names[0]]
    table = markdown_table(("model", "train img/s", f"x {names[0]}"),
                           [(n, speed[n], f"{speed[n] / first:.2f}") for n in names])
    return (f"Training speed, the models interleaved in this process (median of {rounds} "
            f"rounds of one {cfg.data.batch_size}-image step each, {torch.get_num_threads()} "
            f"thread(s); load average {before:.1f} before, {after:.1f} after, on "
            f"{os.cpu_count()} CPUs):\n{table}")
