"""Recipes, config validation and command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnconv.classification.config import ClassificationConfig
from attnconv.classification.demo import demo_config
from attnconv.cli import build_parser
from attnconv.engine.config import ConfigError, apply, config_from_args, load_recipe
from attnconv.recipes import recipe_path

RECIPES = recipe_path("demo").parent


def test_rfaconv_recipe_matches_the_papers_imagenet_recipe() -> None:
    # the AW paper's ImageNet setting: 100 epochs, SGD lr 0.1, momentum 0.9, wd 1e-4,
    # lr x0.1 at 30/60/90, RandomResizedCrop 224 + flip.
    cfg = load_recipe(RECIPES / "imagenet_rfaconv.yaml", ClassificationConfig)
    assert cfg.trainer.max_epochs == 100
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.1, 0.9)
    assert cfg.optim.weight_decay == 1e-4
    assert (cfg.optim.scheduler, cfg.optim.milestones, cfg.optim.gamma) == (
        "multistep", [30, 60, 90], 0.1)
    assert cfg.optim.warmup_epochs == 0 and cfg.optim.label_smoothing == 0.0
    assert (cfg.data.name, cfg.data.image_size, cfg.data.augment) == ("imagefolder", 224, True)
    assert cfg.model_args["cifar_stem"] is False
    # lr 0.1 belongs to a global batch of 256.
    assert cfg.data.batch_size * int(cfg.trainer.devices) == 256


def test_resnet_aw_recipe_is_the_90_epoch_imagenet_recipe() -> None:
    cfg = load_recipe(RECIPES / "imagenet_resnet_aw.yaml", ClassificationConfig)
    assert cfg.model in {"resnet50_aw", "resnet101_aw"}
    assert cfg.trainer.max_epochs == 90
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert (cfg.optim.milestones, cfg.optim.gamma) == ([30, 60], 0.1)
    assert cfg.data.batch_size * int(cfg.trainer.devices) == 256


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_recipes(name: str, classes: int) -> None:
    cfg = load_recipe(RECIPES / f"{name}.yaml", ClassificationConfig)
    assert cfg.data.name == name and cfg.data.image_size == 32
    assert cfg.model_args["cifar_stem"] is True
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.trainer.max_epochs) == (0.1, 5e-4, 200)


def test_demo_runs_the_shipped_demo_recipe() -> None:
    recipe = load_recipe("demo", ClassificationConfig)
    demo = demo_config(out_dir="elsewhere", max_epochs=2)
    assert (demo.out_dir, demo.name, demo.trainer.max_epochs) == ("elsewhere", "compare", 2)
    assert demo.overwrite  # `make demo` twice replaces the first demo's runs
    assert apply(demo, {"out_dir": recipe.out_dir, "name": recipe.name, "overwrite": False,
                        "trainer": {"max_epochs": recipe.trainer.max_epochs,
                                    "progress_bar": recipe.trainer.progress_bar}}) == recipe


def test_unknown_key_in_recipe_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        load_recipe(recipe, ClassificationConfig)
    recipe.write_text("epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'epochs'"):
        load_recipe(recipe, ClassificationConfig)


def test_wrong_type_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"trainer.max_epochs must be an integer"):
        apply(ClassificationConfig(), {"trainer": {"max_epochs": "ten"}})


def test_command_line_overrides_recipe_overrides_defaults() -> None:
    args = build_parser().parse_args(
        ["train", "--config", str(RECIPES / "cifar10.yaml"), "--model", "resnet18_rfa",
         "--data.root", "/data/cifar", "--optim.lr", "0.2", "--model_args", "{channels: [8]}"])
    cfg = config_from_args(args, ClassificationConfig())
    assert cfg.model == "resnet18_rfa"
    assert cfg.data.root == "/data/cifar" and cfg.data.name == "cifar10"
    assert cfg.optim.lr == 0.2 and cfg.optim.weight_decay == 5e-4  # option, then recipe
    assert cfg.data.val_fraction == 0.2  # default
    assert cfg.model_args == {"cifar_stem": True, "channels": [8]}


def test_module_options_reach_the_module(capsys: pytest.CaptureFixture) -> None:
    from attnconv.classification.data import build_datasets
    from attnconv.classification.run import Classification

    def module(*options: str) -> torch.nn.Module:
        args = build_parser().parse_args(["train", "--config", "demo", *options])
        cfg = config_from_args(args, ClassificationConfig())
        return Classification(cfg).module(build_datasets(cfg.data), load_init=True)[0]

    def stem(m: torch.nn.Module) -> torch.Tensor:  # the first conv of more than one channel
        return next(c for c in m.modules()
                    if isinstance(c, torch.nn.Conv2d) and c.in_channels > 1).weight

    fast = module("--channels_last", "true")
    assert fast.channels_last and not module().channels_last
    assert stem(fast).is_contiguous(memory_format=torch.channels_last)
    assert not stem(fast).is_contiguous()
    with pytest.raises(SystemExit):  # a module option, not a trainer one
        build_parser().parse_args(["train", "--trainer.channels_last", "true"])
    assert "did you mean --channels_last" in capsys.readouterr().err


def test_unknown_command_line_option_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--optim.learning_rate", "0.1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --optim.learning_rate" in capsys.readouterr().err


def test_every_option_has_help_and_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--data.root", "--optim.milestones", "--trainer.precision", "--resume"):
        assert option in text
    assert "(default: 32-true)" in text and "(default: [30, 60, 90])" in text
