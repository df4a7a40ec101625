"""What ``attnconv demo`` runs: the training comparison of a plain, an AW and an RFA ResNet-18
on the embedded digits, with the shipped ``demo`` recipe (``attnconv/recipes/demo.yaml``)."""

from __future__ import annotations

from attnconv.training.config import RunConfig, apply, load_recipe

#: The three variants of a narrow CIFAR-stem ResNet-18 the demo compares.
DEMO_MODELS = ("resnet18", "resnet18_aw", "resnet18_rfa")


def demo_config(out_dir: str = "runs/demo", progress_bar: bool = False,
                max_epochs: int | None = None) -> RunConfig:
    """The RunConfig of ``attnconv demo``: the shipped ``demo`` recipe, writing to
    ``OUT_DIR/compare`` (a demo run replaces the previous one)."""
    values: dict = {"out_dir": out_dir, "name": "compare", "overwrite": True,
                    "trainer": {"progress_bar": progress_bar}}
    if max_epochs is not None:
        values["trainer"]["max_epochs"] = max_epochs
    return apply(load_recipe("demo"), values, where="demo options")
