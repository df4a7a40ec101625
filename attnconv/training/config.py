"""Run configuration: nested dataclasses, YAML recipes and dotted command-line overrides.

Precedence is defaults < recipe file < ``--section.key value`` options. Every key a recipe or an
option names must exist: a typo is an error before any data is read or any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or an option that cannot describe a run (unknown key, wrong type)."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    name: str = _opt("digits", "dataset: digits (embedded, no download), cifar10, cifar100, "
                               "imagefolder (ROOT/train/CLASS/*.png and ROOT/val/CLASS/*)")
    root: str | None = _opt(None, "dataset folder; required for cifar10/100 and imagefolder")
    download: bool = _opt(False, "download CIFAR into root when it is not there")
    image_size: int | None = _opt(None, "side of the square images fed to the model; None: the "
                                        "dataset's own (digits 8, CIFAR 32, imagefolder 224)")
    batch_size: int = _opt(64, "samples per batch on each device")
    num_workers: int = _opt(0, "data-loading worker processes per device")
    val_fraction: float = _opt(0.2, "digits only: share of samples held out for validation")
    augment: bool = _opt(True, "training augmentation (random-resized crop, flip if the data "
                               "allows; a small random shift for digits)")
    check: bool = _opt(False, "open every image file once before training (names every file "
                              "that cannot be read)")


@dataclass
class OptimConfig:
    name: str = _opt("sgd", "optimizer: sgd or adamw")
    lr: float = _opt(0.1, "learning rate for a batch of data.batch_size x devices x nodes")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "SGD Nesterov momentum")
    weight_decay: float = _opt(1e-4, "weight decay")
    scheduler: str = _opt("multistep", "lr schedule per epoch: multistep, cosine or constant")
    milestones: list = field(default_factory=lambda: [30, 60, 90], metadata={
        "help": "multistep: epochs at which lr is multiplied by gamma"})
    gamma: float = _opt(0.1, "multistep: lr factor at each milestone")
    warmup_epochs: int = _opt(0, "epochs of linear lr warm-up before the schedule")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")


@dataclass
class TrainerConfig:
    max_epochs: int = _opt(10, "epochs to train")
    accelerator: str = _opt("auto", "cpu, gpu, or auto (a GPU when there is one)")
    devices: str = _opt("auto", "devices per node: a count, a list such as '0,1', or auto")
    num_nodes: int = _opt(1, "machines; under torchrun set it to the number of nodes")
    strategy: str = _opt("auto", "auto (one device; DDP when devices > 1), ddp, ...")
    precision: str = _opt("32-true", "32-true, bf16-mixed, 16-mixed, ...")
    channels_last: bool = _opt(False, "channels-last memory format (faster on GPUs with AMP)")
    compile: bool = _opt(False, "torch.compile the model")
    deterministic: bool = _opt(False, "deterministic algorithms (exact resume; slower on GPU)")
    log_every_n_steps: int = _opt(10, "steps between logged training metrics")
    progress_bar: bool = _opt(True, "a progress bar per epoch")
    limit_train_batches: float = _opt(1.0, "share (<= 1.0) or number of train batches per epoch")
    limit_val_batches: float = _opt(1.0, "share (<= 1.0) or number of val batches per epoch")


@dataclass
class RunConfig:
    model: str = _opt("resnet18", "model name (attnconv.create_model)")
    model_args: dict = field(default_factory=lambda: {"cifar_stem": True,
                                                      "channels": [16, 32, 64, 128]},
                             metadata={"help": "keyword arguments for the model (YAML mapping; "
                                               "keys given replace the default's)"})
    seed: int = _opt(0, "random seed of weights, data order and augmentation")
    out_dir: str = _opt("runs", "folder that holds one sub-folder per run")
    name: str | None = _opt(None, "run sub-folder name (default: MODEL-sSEED)")
    resume: str | None = _opt(None, "checkpoint to continue from, or 'last' for RUN/last.ckpt")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig}
# Keys whose values are free-form mappings: their own keys are the model's business.
_FREE_MAPPINGS = {"model_args"}


def _unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint} "
                       f"(known: {', '.join(sorted(known))})")


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Check a YAML value against the type of the field's default (ints pass as floats)."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(default, str) and isinstance(value, int | float):
        return str(value)
    elif not isinstance(value, type(default)):
        raise ConfigError(f"{key} must be a {type(default).__name__}, not {value!r}")
    return value


def apply(config: RunConfig, values: Mapping[str, Any], where: str = "config") -> RunConfig:
    """Copy of ``config`` with nested ``values`` applied; unknown keys raise ConfigError."""
    config = dataclasses.replace(config, **{s: dataclasses.replace(getattr(config, s))
                                            for s in SECTIONS})
    top = [f.name for f in dataclasses.fields(RunConfig)]
    for key, value in values.items():
        if key not in top:
            raise _unknown_key(key, top, where)
        if key in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{key}' in {where} must be a mapping of its keys")
            section = getattr(config, key)
            names = [f.name for f in dataclasses.fields(section)]
            for sub, sub_value in value.items():
                if sub not in names:
                    raise _unknown_key(f"{key}.{sub}", [f"{key}.{n}" for n in names], where)
                setattr(section, sub, _coerce(sub_value, getattr(section, sub), f"{key}.{sub}"))
        elif key in _FREE_MAPPINGS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{key}' in {where} must be a mapping")
            setattr(config, key, {**getattr(config, key), **value})
        else:
            setattr(config, key, _coerce(value, getattr(config, key), key))
    return config


def load_recipe(path: str | Path, config: RunConfig | None = None) -> RunConfig:
    """A RunConfig from a YAML recipe applied over ``config`` (defaults when None)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    return apply(config or RunConfig(), values, where=str(path))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one ``--key`` / ``--section.key`` option per field of RunConfig."""
    parser.add_argument("--config", metavar="YAML", help="recipe file (see recipes/); "
                        "options given on the command line override it")

    def add(name: str, f: dataclasses.Field, default: Any) -> None:
        # SUPPRESS: only options actually given override the recipe.
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                            type=str if default is None or isinstance(default, str)
                            else yaml.safe_load,
                            help=f"{f.metadata['help']} (default: {default})")

    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            for sf in dataclasses.fields(SECTIONS[f.name]):
                add(f"{f.name}.{sf.name}", sf, getattr(getattr(defaults, f.name), sf.name))
        else:
            add(f.name, f, getattr(defaults, f.name))


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The RunConfig that ``--config`` and the dotted options of ``args`` describe."""
    config = base or RunConfig()
    if getattr(args, "config", None):
        config = load_recipe(args.config, config)
    nested: dict[str, Any] = {}
    for key, value in vars(args).items():
        head, _, tail = key.partition(".")
        if tail and head in SECTIONS:
            nested.setdefault(head, {})[tail] = value
        elif head in {f.name for f in dataclasses.fields(RunConfig)}:
            nested[head] = value
    return apply(config, nested, where="command line")
