"""Segmentation run configuration: typed sections, YAML recipes and ``--section.key value``
options, with classification's rules (defaults < recipe < options; unknown keys and wrong
types are a :class:`~attnconv.training.config.ConfigError`).

Without options a run is the CPU demo: DeepLabV3 over a narrow ResNet-18 on the generated
shapes. A recipe states ``model_args`` whole: no default of the demo leaks into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attnconv.training.config import ConfigError, TrainerConfig


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


#: The demo's model: narrow enough to train on 64 px shapes in about a minute on 2 CPU cores.
DEMO_MODEL_ARGS: dict[str, Any] = {
    "backbone_args": {"channels": [16, 32, 64, 128]},
    "replace_stride_with_dilation": [False, True, True],
    "aux_loss": False,
}


@dataclass
class SegDataConfig:
    name: str = _opt("shapes", "dataset: shapes (generated, no download), voc (VOC 2012), "
                               "voc_aug (VOC 2012 train + SBD), folder (ROOT/images/SPLIT, "
                               "ROOT/masks/SPLIT)")
    root: str | None = _opt(None, "dataset folder (voc: the folder holding VOCdevkit; shapes: "
                                  "where to generate, default RUN/shapes)")
    sbd_root: str | None = _opt(None, "voc_aug: SBD folder (img/, cls/, train_noval.txt)")
    num_classes: int | None = _opt(None, "folder: classes including background")
    base_size: int = _opt(64, "short side of the training images before their random scale "
                              "(0.5-2x)")
    eval_size: int | None = _opt(None, "short side of the validation images; none: their own")
    crop_size: int = _opt(64, "side of the square training crops")
    batch_size: int = _opt(8, "samples per batch on each device")
    num_workers: int = _opt(0, "data-loading worker processes per device")
    num_train: int = _opt(96, "shapes: generated training images")
    num_val: int = _opt(24, "shapes: generated validation images")
    image_size: int = _opt(64, "shapes: side of the generated images")


@dataclass
class SegOptimConfig:
    """SGD with the "poly" schedule of DeepLab: lr x (1 - step / steps) ** power, per step."""

    lr: float = _opt(0.02, "learning rate (the auxiliary head's is 10x, as torchvision's "
                           "reference)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(1e-4, "weight decay")
    power: float = _opt(0.9, "poly schedule exponent")
    warmup_iters: int = _opt(0, "optimizer steps of linear warm-up")
    aux_weight: float = _opt(0.5, "weight of the auxiliary head's loss (with aux_loss)")


def _demo_trainer() -> TrainerConfig:
    return TrainerConfig(max_epochs=8, accelerator="cpu", devices="1", log_every_n_steps=5)


@dataclass
class SegConfig:
    model: str = _opt("resnet18", "backbone: any attnconv.create_model ResNet name")
    head: str = _opt("deeplabv3", "deeplabv3 or fcn (torchvision's heads)")
    model_args: dict = field(default_factory=lambda: dict(DEMO_MODEL_ARGS), metadata={
        "help": "keyword arguments of attnconv.models.segmentation.deeplabv3 / fcn (aux_loss, "
                "replace_stride_with_dilation, dilated_convs, pretrained_backbone, "
                "backbone_args); a recipe states them all"})
    seed: int = _opt(0, "random seed")
    out_dir: str = _opt("runs", "folder that holds one sub-folder per run")
    name: str | None = _opt(None, "run sub-folder name (default: HEAD_MODEL-sSEED)")
    resume: str | None = _opt(None, "checkpoint to continue from, or 'last' for RUN/last.ckpt")
    data: SegDataConfig = field(default_factory=SegDataConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    trainer: TrainerConfig = field(default_factory=_demo_trainer)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        return self.name or f"{self.head}_{self.model}-s{self.seed}"


SECTIONS = {"data": SegDataConfig, "optim": SegOptimConfig, "trainer": TrainerConfig}


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _coerce(value: Any, f: dataclasses.Field, key: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" not in kind:
            raise ConfigError(f"{key} must not be null")
        return None
    base = kind.split(" | ")[0]
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if base == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an int, not {value!r}")
    if base == "str" and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if base == "str" and not isinstance(value, str):
        raise ConfigError(f"{key} must be a str, not {value!r}")
    if base == "float" and not isinstance(value, float):
        raise ConfigError(f"{key} must be a float, not {value!r}")
    if base in ("dict", "list") and not isinstance(value, dict if base == "dict" else list):
        raise ConfigError(f"{key} must be a {base}, not {value!r}")
    return value


def apply(config: SegConfig, values: Mapping[str, Any], where: str = "config",
          replace_model_args: bool = True) -> SegConfig:
    """Copy of ``config`` with nested ``values``; ``model_args`` given in a recipe replace the
    defaults whole (``replace_model_args``), given as options they change the keys named."""
    config = dataclasses.replace(config, model_args=dict(config.model_args),
                                 **{s: dataclasses.replace(getattr(config, s)) for s in SECTIONS})
    top = {f.name: f for f in dataclasses.fields(SegConfig)}
    for key, value in values.items():
        if key not in top:
            raise _unknown(key, list(top), where)
        if key in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{key}' in {where} must be a mapping of its keys")
            section = getattr(config, key)
            fields = {f.name: f for f in dataclasses.fields(section)}
            for sub, sub_value in value.items():
                if sub not in fields:
                    raise _unknown(f"{key}.{sub}", [f"{key}.{n}" for n in fields], where)
                setattr(section, sub, _coerce(sub_value, fields[sub], f"{key}.{sub}"))
        elif key == "model_args":
            if not isinstance(value, Mapping):
                raise ConfigError(f"'model_args' in {where} must be a mapping")
            config.model_args = dict(value) if replace_model_args else {**config.model_args,
                                                                        **value}
        else:
            setattr(config, key, _coerce(value, top[key], key))
    return config


def load_recipe(path: str | Path, config: SegConfig | None = None) -> SegConfig:
    """A SegConfig from a YAML recipe over ``config`` (defaults when None)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    return apply(config or SegConfig(), values, where=str(path))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one ``--key`` / ``--section.key`` option per field of SegConfig."""
    parser.add_argument("--config", metavar="YAML", help="recipe file (see "
                        "recipes/segmentation/); options override it")
    defaults = SegConfig()

    # Numbers parse as their field's type ('1e-3' is a float, '1' for an int field an int).
    parsers = {"str": str, "int": int, "float": float}

    def add(name: str, f: dataclasses.Field, default: Any) -> None:
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                            type=parsers.get(str(f.type).split(" | ")[0], yaml.safe_load),
                            help=f"{f.metadata['help']} (default: {default})")

    for f in dataclasses.fields(SegConfig):
        if f.name in SECTIONS:
            for sf in dataclasses.fields(SECTIONS[f.name]):
                add(f"{f.name}.{sf.name}", sf, getattr(getattr(defaults, f.name), sf.name))
        else:
            add(f.name, f, getattr(defaults, f.name))


def config_from_args(args: argparse.Namespace) -> SegConfig:
    config = SegConfig()
    if getattr(args, "config", None):
        config = load_recipe(args.config, config)
    nested: dict[str, Any] = {}
    for key, value in vars(args).items():
        head, _, tail = key.partition(".")
        if tail and head in SECTIONS:
            nested.setdefault(head, {})[tail] = value
        elif head in {f.name for f in dataclasses.fields(SegConfig)}:
            nested[head] = value
    return apply(config, nested, where="command line", replace_model_args=False)


__all__ = ["DEMO_MODEL_ARGS", "SegConfig", "SegDataConfig", "SegOptimConfig",
           "add_config_arguments", "apply", "config_from_args", "load_recipe"]
