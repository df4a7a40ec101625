"""One typed configuration system for every task: nested dataclasses, YAML recipes, dotted
command-line options.

A task's config is a dataclass whose dataclass-typed fields are *sections* (``data``, ``optim``,
``trainer``) and whose other fields are top-level keys. Precedence is defaults < recipe <
``--section.key value`` options. Every value is checked against the field's type hint (so
``1e-3`` is a float and ``1`` for an ``int | float`` field stays an int), every key must exist
(close names are suggested) and ``choices`` and the range (``min``, ``max``, ``above``,
``below``) in a field's metadata are enforced and shown in the options' help.

Every task's config extends :class:`RunConfig` (model, seed, run folder, resume, trainer
section). A recipe names its task (``task: detection``): loading it for another task is refused
with the command that takes it.

Free mappings (``model_args``): a recipe states the whole mapping, replacing the default, so
one recipe's keys never leak into another's; on the command line ``--model_args '{k: v}'``
changes only the keys it names.

Nothing here imports Lightning, so ``attnconv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from attnconv.errors import ConfigError

C = TypeVar("C")


#: Seeds that every generator a run seeds takes (NumPy's limit).
MAX_SEED = 2**32 - 1
#: The largest image side an option accepts: larger ones only fail later, allocating
#: terabytes.
MAX_IMAGE_SIDE = 4096


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None,
        min: float | None = None, max: float | None = None, above: float | None = None,
        below: float | None = None) -> Any:
    """A config field with its help text and, optionally, its allowed values or range:
    ``min`` / ``max`` inclusive, ``above`` / ``below`` exclusive (a list's items each)."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": min,
                                            "max": max, "above": above, "below": below})


_BOUNDS = (("min", ">=", lambda v, b: v >= b), ("above", ">", lambda v, b: v > b),
           ("max", "<=", lambda v, b: v <= b), ("below", "<", lambda v, b: v < b))


def range_text(metadata: Mapping[str, Any]) -> str:
    """The range a field's metadata allows, e.g. ``> 0 and <= 1`` ('' without one)."""
    return " and ".join(f"{sign} {metadata[name]}" for name, sign, _ in _BOUNDS
                        if metadata.get(name) is not None)


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every task."""

    max_epochs: int = opt(10, "epochs to train", min=1)
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: no limit)", min=-1)
    accelerator: str = opt("auto", "cpu, gpu, or auto (a GPU when there is one)")
    devices: str = opt("auto", "devices per node: a count >= 1, a list such as '0,1', or auto")
    num_nodes: int = opt(1, "machines; under torchrun set it to the number of nodes", min=1)
    strategy: str = opt("auto", "auto (one device; DDP when devices > 1), ddp, ...")
    precision: str = opt("32-true", "32-true, bf16-mixed, 16-mixed, ...")
    deterministic: bool = opt(False, "deterministic algorithms (exact resume; slower on GPU)")
    log_every_n_steps: int = opt(10, "steps between logged training metrics", min=1)
    check_val_every_n_epoch: int = opt(1, "epochs between validations", min=1)
    progress_bar: bool = opt(False, "per-epoch progress bars (the job's one bar is always on)")
    limit_train_batches: int | float = opt(1.0, "train batches per epoch: a share (a float "
                                                "<= 1.0) or a count (an int: 1 is one batch)",
                                           min=0)
    limit_val_batches: int | float = opt(1.0, "val batches per epoch: a share (a float "
                                              "<= 1.0) or a count (an int)", min=0)


def parse_devices(devices: str) -> int | str | list[int]:
    """``'4'`` -> 4, ``'0,1'`` -> [0, 1], ``'auto'`` -> ``'auto'`` (Lightning's forms);
    ConfigError for anything else (``-1``, Lightning's "all GPUs", included: say auto)."""
    text = str(devices).strip()
    if text.isdigit():
        return int(text)
    if text == "auto":
        return text
    parts = [d.strip() for d in text.split(",") if d.strip()]
    if "," in text and parts and all(d.isdigit() for d in parts):
        return [int(d) for d in parts]
    raise ConfigError(f"trainer.devices must be a count >= 1, a list of device indices such "
                      f"as '0,1', or auto, not {devices!r}")


#: Options every run's resume may change: they change how the rest of the run is run or
#: shown, not what it computes. A task adds its own (:attr:`RunConfig.resume_applies`).
RESUME_APPLIES = frozenset({
    "resume", "overwrite", "out_dir", "name", "trainer.max_epochs", "trainer.max_steps",
    "trainer.progress_bar", "trainer.log_every_n_steps", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.accelerator",
})


@dataclass
class RunConfig:
    """The fields of every task's run; a task's config extends it with its ``data`` and
    ``optim`` sections and states what is its own in the class attributes below."""

    #: The task a recipe for this config names in its ``task`` key.
    task: ClassVar[str] = ""
    #: The command that trains this task (named by refusals of another task's recipe).
    command: ClassVar[str] = ""
    #: Options of the task's sections a resume may change (beyond :data:`RESUME_APPLIES`).
    resume_applies: ClassVar[frozenset[str]] = frozenset()
    #: What the task writes into a run folder, beside the checkpoints and logs.
    run_files: ClassVar[frozenset[str]] = frozenset()
    #: What the task generates into a run folder as the run's input: kept by an overwrite.
    run_inputs: ClassVar[frozenset[str]] = frozenset()
    #: Every task's config, by its task (filled as each is defined).
    TASKS: ClassVar[dict[str, type[RunConfig]]] = {}

    model: str = opt("resnet18", "the zoo network (attnconv.create_model name); for detection "
                                 "and segmentation, the backbone")
    model_args: dict = field(default_factory=dict, metadata={
        "help": "keyword arguments of the model (a recipe states them all; an option changes "
                "the keys it names)"})
    init: str | None = opt(None, "start from pretrained weights of the plain network: "
                                 "torchvision:NAME[.WEIGHTS], timm:NAME or a weights file")
    seed: int = opt(0, "random seed of weights, data order and augmentation", min=0,
                    max=MAX_SEED)
    out_dir: str = opt("runs", "folder that holds one sub-folder per run")
    name: str | None = opt(None, "run sub-folder name (default: the model and the seed, e.g. "
                                 "resnet18-s0)")
    resume: str | None = opt(None, "checkpoint to continue from, or 'last' for RUN/last.ckpt")
    overwrite: bool = opt(False, "replace an earlier run in the run folder (without it, such a "
                                 "folder is refused unless resuming)")
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.task:
            RunConfig.TASKS[cls.task] = cls

    @property
    def run_name(self) -> str:
        """The run folder's name: ``name``, or the model and the seed."""
        return self.name or f"{self.model}-s{self.seed}"

    def check(self) -> None:
        """ModelNameError for a model the zoo does not have, ConfigError for what the keys' own
        checks cannot see; a task adds its own. The run template calls it once, before any
        data is read or any model is built."""
        from attnconv.models import check_model_name

        check_model_name(self.model)

    @classmethod
    def resumable(cls) -> frozenset[str]:
        """Every option a resume of this task's runs may change."""
        return RESUME_APPLIES | cls.resume_applies

    def to_dict(self) -> dict[str, Any]:
        """The config as builtins only (what checkpoints store, read back weights-only)."""
        return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))


def is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint} "
                       f"(known: {', '.join(sorted(known))})")


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(typing.get_origin(hint) or hint, str(hint))


def _number(value: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return None


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML) as the type ``hint`` says, or ConfigError naming ``key``."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in args:  # int before float: `int | float` keeps 1 as one batch
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {_type_name(hint)}, not {value!r}")
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and isinstance(_number(value), int):
            return int(value)
    elif origin is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-3 (no dot) as a string.
        if isinstance(value, str) and _number(value) is not None:
            return float(value)
    elif origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, list | tuple):
            item = args[0] if args else None
            return [coerce(v, item, f"{key}[{i}]") if item else v for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise ConfigError(f"{key} must be {_type_name(hint)}, not {value!r}")


def _check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, not {value!r}")
    values = value if isinstance(value, list) else [value]
    for name, _, holds in _BOUNDS:
        bound = f.metadata.get(name)
        if bound is not None and any(v is not None and not holds(v, bound) for v in values):
            each = "each of " if isinstance(value, list) else ""
            raise ConfigError(f"{each}{key} must be {range_text(f.metadata)}, not {value!r}")


def _copy(config: C) -> C:
    """A copy deep enough that setting keys of the copy or its sections leaves ``config``."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _copy(value)
        elif isinstance(value, dict | list):
            changes[f.name] = type(value)(value)
    return dataclasses.replace(config, **changes)


def apply(config: C, values: Mapping[str, Any], where: str = "config", *,
          merge_mappings: bool = False) -> C:
    """Copy of ``config`` with nested ``values`` applied.

    Unknown keys, wrong types and out-of-range values raise ConfigError. Free mappings
    (``dict`` fields such as ``model_args``) are replaced, or updated with
    ``merge_mappings=True`` (what command-line options do).
    """
    config = _copy(config)
    _apply(config, values, where, "", merge_mappings)
    return config


def _apply(target: Any, values: Mapping[str, Any], where: str, prefix: str,
           merge: bool) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    types_ = hints(type(target))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(full, [f"{prefix}{n}" for n in fields], where)
        hint = types_[key]
        if is_section(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{full}' in {where} must be a mapping of its keys")
            _apply(getattr(target, key), value, where, f"{full}.", merge)
            continue
        value = coerce(value, hint, full)
        if merge and isinstance(value, dict):
            value = {**getattr(target, key), **value}
        _check_bounds(fields[key], value, full)
        setattr(target, key, value)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML recipe file (ConfigError when it is missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(values, Mapping):
        raise ConfigError(f"recipe {path} must be a YAML mapping")
    return dict(values)


def load_recipe(name_or_path: str | Path, config: C | type[C]) -> C:
    """``config`` (a task's config, or its class for the defaults) with the recipe
    ``name_or_path`` applied: a shipped recipe's name (``imagenet_rfaconv``, see
    :func:`attnconv.recipes.list_recipes`) or a YAML file.

    A recipe's ``task`` key names the task it is for; a recipe of another task is refused,
    naming the command that takes it.
    """
    from attnconv.recipes import recipe_path

    if isinstance(config, type):
        config = config()
    path = recipe_path(name_or_path)
    values = read_recipe(path)
    task = values.pop("task", None)
    ours = getattr(config, "task", "")
    if task is not None and ours and task != ours:
        other = RunConfig.TASKS.get(task)
        use = f"use attnconv {other.command} --config {name_or_path}" if other else \
            f"attnconv {getattr(config, 'command', '')} takes {ours} recipes"
        raise ConfigError(f"recipe {name_or_path} is for {task}, not {ours}: {use}")
    return apply(config, values, where=str(path))


def _flat_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    out = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        if is_section(types_[f.name]):
            out += _flat_fields(types_[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, types_[f.name]))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, config: Any,
                         exclude: Sequence[str] = ()) -> None:
    """``--config`` and one ``--key`` / ``--section.key`` option per field of ``config``
    (an instance: its values are the defaults shown in the help)."""
    parser.add_argument("--config", metavar="NAME|YAML",
                        help="a shipped recipe's name (see `attnconv recipes`) or a YAML file; "
                        "options given on the command line override it")
    for name, f, hint in _flat_fields(type(config)):
        if name in exclude:
            continue
        default = config
        for part in name.split("."):
            default = getattr(default, part)
        # SUPPRESS: only options actually given override the recipe. Values stay text here
        # and are parsed by the field's type in config_from_args.
        bounds = range_text(f.metadata)
        if bounds:
            each = "each " if (typing.get_origin(hint) or hint) is list else ""
            bounds = f"; {each}{bounds}"
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{f.metadata.get('help', '')}{bounds} (default: {default})")


def _from_text(text: str, hint: Any, key: str) -> Any:
    # A plain string field takes the text as it is ('1e-3' as a run name stays '1e-3').
    if hint is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        if (typing.get_origin(hint) or hint) in (dict, list):
            problem = " ".join(str(getattr(err, "problem", "") or err).split())
            example = ("a mapping such as '{channels: [8, 16, 32, 64]}'" if hint is dict
                       else "a list such as '[8, 11]'")
            raise ConfigError(f"--{key} is not valid YAML ({problem}): write {example}"
                              ) from None
        return text


def config_from_args(args: argparse.Namespace, config: C) -> C:
    """``config`` with ``--config`` and the dotted options of ``args`` applied."""
    if getattr(args, "config", None):
        config = load_recipe(args.config, config)
    fields = {name: hint for name, _, hint in _flat_fields(type(config))}
    nested: dict[str, Any] = {}
    for key, text in vars(args).items():
        if key not in fields:
            continue
        value = _from_text(text, fields[key], key) if isinstance(text, str) else text
        *heads, tail = key.split(".")
        target = nested
        for head in heads:
            target = target.setdefault(head, {})
        target[tail] = value
    return apply(config, nested, where="command line", merge_mappings=True)
