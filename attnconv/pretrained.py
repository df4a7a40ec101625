"""Start a network with attention convs from pretrained weights of the plain network.

AW-convolution (Zhu et al., ICANN 2021, arXiv:2108.08205) starts with A = 0, so a network started
from plain ImageNet weights computes exactly what the plain network did until its attention is
trained; the RFA family (Zhang et al., arXiv:2304.03198) keeps the plain kernel as the ``weight``
of its final conv. Everything that is not attention must come from the weights: a tensor that is
missing, left over or of another shape is an error naming the keys, except the classifier, which
is re-initialised when the class count differs.

Sources (:func:`load_init_state`): ``torchvision:NAME[.WEIGHTS]`` and ``timm:NAME`` go through
those libraries' own download and cache (one download on a machine with internet, the cache on an
offline one); anything else is a local weights file (a state dict, an ``attnconv train``
checkpoint, or an official RFAConv ImageNet checkpoint, recognised by its keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attnconv.layers import ATTN_LAYERS, is_attention_conv
from attnconv.weights import read_state_dict


class InitError(ValueError):
    """The weights cannot start this network: a source that cannot be read or does not fit."""


@dataclass
class InitReport:
    """What :func:`init_from` did: tensors loaded, attention tensors left at their neutral start,
    checkpoint tensors not used, and whether the classifier was re-initialised."""

    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    classifier_reset: str = ""

    def __str__(self) -> str:
        text = (f"init from {self.source}: {len(self.loaded)} tensors loaded, "
                f"{len(self.new)} new attention tensors, {len(self.skipped)} skipped")
        if self.classifier_reset:
            text += f" ({self.classifier_reset})"
        return text


def _activation_attention_types() -> tuple[type, ...]:
    # attnconv's attention modules subclass timm's; timm's own (seresnet's SE) count too.
    return tuple({base for cls in ATTN_LAYERS.values() for base in cls.__mro__[:2]})


def attention_keys(model: nn.Module) -> tuple[set[str], set[str]]:
    """State-dict keys of ``model`` that a plain network lacks: the attention tensors, and the
    biases of attention convs (which a bias-free plain conv lacks; they start at zero)."""
    module_types = _activation_attention_types()
    keys = list(model.state_dict())
    attention: set[str] = set()
    biases: set[str] = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, module_types):
            attention.update(k for k in keys if k.startswith(prefix))
        elif is_attention_conv(module):
            attention.update(k for k in keys if k.startswith(prefix)
                             and k not in (f"{prefix}weight", f"{prefix}bias"))
            if getattr(module, "bias", None) is not None:
                biases.add(f"{prefix}bias")
    return attention, biases


def _classifier_prefix(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return f"{cfg.get('classifier', 'fc')}."


def _torchvision_state(name: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_model_weights

    model_name, _, weights_name = name.partition(".")
    try:
        enum = get_model_weights(model_name)
    except ValueError as err:
        raise InitError(f"torchvision has no model {model_name!r} ({err})") from None
    try:
        weights = enum[weights_name] if weights_name else enum.DEFAULT
    except KeyError:
        raise InitError(f"torchvision has no weights {weights_name!r} for {model_name}; "
                        f"expected one of {[w.name for w in enum]}") from None
    try:
        # check_hash=False: torchvision's own default; the cache file is trusted as downloaded.
        return weights.get_state_dict(progress=True, check_hash=False)
    except OSError as err:  # URLError: offline and not in torch.hub's cache
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise InitError(f"torchvision weights {model_name}.{weights.name} are not in the cache "
                        f"({hub}) and could not be downloaded: {err}") from None


def _timm_state(name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except RuntimeError as err:  # timm's "Unknown model"
        raise InitError(f"timm: {err}") from None
    except OSError as err:  # offline and not in the Hugging Face cache
        raise InitError(f"timm weights {name!r} are not in the Hugging Face cache and could not "
                        f"be downloaded: {type(err).__name__}: {err}") from None


def load_init_state(source: str) -> dict[str, torch.Tensor]:
    """The state dict ``source`` names: ``torchvision:NAME[.WEIGHTS]``, ``timm:NAME`` or a file."""
    kind, sep, name = source.partition(":")
    if sep and kind == "torchvision":
        return _torchvision_state(name)
    if sep and kind == "timm":
        return _timm_state(name)
    if not Path(source).is_file():
        raise InitError(f"init: {source!r} is neither torchvision:NAME, timm:NAME nor an "
                        "existing weights file")
    return read_state_dict(source)


def _load_official_rfa_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Move official RFAConv layers' tensors from ``state`` into ``model``'s RFA layers (through
    each layer's ``load_official_state_dict``); returns the model keys they filled."""
    filled: list[str] = []
    for name, layer in model.named_modules():
        prefix = f"{name}."
        layer_keys = [k for k in state if k.startswith(prefix)]
        # The official layers name their depthwise feature conv "generate..."; ours do not.
        if not hasattr(layer, "load_official_state_dict") or not any(
                k.removeprefix(prefix).startswith("generate") for k in layer_keys):
            continue
        trailing = layer.load_official_state_dict(
            {k.removeprefix(prefix): state.pop(k) for k in layer_keys})
        if trailing:
            raise InitError(f"{name} has a trailing BatchNorm ({sorted(trailing)}): that is the "
                            "official model.py layer layout, not an ImageNet ResNet checkpoint")
        filled += [f"{prefix}{k}" for k in layer.state_dict()]
    return filled


def init_from(model: nn.Module, source: str | Mapping[str, torch.Tensor]) -> InitReport:
    """Fill ``model`` from pretrained weights (a source string or a state dict) and report.

    Plain tensors load by name; attention tensors keep their initialisation (AW: A = 0), and an
    attention conv's bias that the plain conv lacked starts at zero. The classifier is skipped
    (left as initialised) when its shape differs. Anything else that is missing, unused or of
    another shape raises :class:`InitError` naming the keys, and so do NaN or Inf weights.
    """
    label = source if isinstance(source, str) else "state dict"
    state = dict(load_init_state(source) if isinstance(source, str) else read_state_dict(source))
    report = InitReport(label)
    report.loaded += _load_official_rfa_layers(model, state)
    own = model.state_dict()
    attention, biases = attention_keys(model)
    classifier = _classifier_prefix(model)
    fits: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape = [], []
    for key, value in state.items():
        if key not in own:
            (report.skipped if key.startswith(classifier) else unexpected).append(key)
        elif own[key].shape != value.shape:
            if not key.startswith(classifier):
                wrong_shape.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
                continue
            report.skipped.append(key)
            if key.endswith("weight"):
                report.classifier_reset = (f"classifier re-initialised: {value.shape[0]} classes "
                                           f"in the weights, {own[key].shape[0]} here")
        else:
            fits[key] = value
    done = set(fits) | set(report.loaded)
    missing = [k for k in own if k not in done]
    report.new = [k for k in missing if k in attention or k in biases]
    plain_missing = [k for k in missing if k not in report.new and k not in state
                     and not k.endswith("num_batches_tracked")
                     and not (k.startswith(classifier) and report.classifier_reset)]
    problems = [f"{what}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                for what, keys in (("missing", plain_missing), ("unexpected", unexpected),
                                   ("other shape", wrong_shape)) if keys]
    if problems:
        raise InitError(f"{label} does not fit {type(model).__name__} "
                        f"(not attention tensors): {'; '.join(problems)}")
    # NaN or Inf weights would end the first steps in a non-finite loss that blames the lr.
    broken = [k for k, v in fits.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise InitError(f"{label} holds NaN or Inf weights in {len(broken)} tensor(s), e.g. "
                        f"{', '.join(broken[:3])}: the file is damaged or was saved from a "
                        "diverged run")
    model.load_state_dict(fits, strict=False)
    with torch.no_grad():
        for key in report.new:
            if key in biases:
                model.get_parameter(key).zero_()
    report.loaded += list(fits)
    return report
