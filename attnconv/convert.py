"""Put attention convs into any network: replace its nn.Conv2d modules, keeping their weights.

AW-convolution (Zhu et al., ICANN 2021, arXiv:2108.08205) starts with A = 0, so a converted
network computes exactly what the original did until the attention is trained. The RFA family
(Zhang et al., arXiv:2304.03198) reuses the original kernel as the ``weight`` of its final conv,
but that conv sees receptive-field features instead of the raw input, so outputs change and the
network needs fine-tuning.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from attnconv.layers import create_conv, get_conv, is_attention_conv

#: ``where``: None (3x3 convs outside the stem), a regex matched against the full module name,
#: a collection of module names, or a predicate ``(name, conv) -> bool``.
Where = str | Iterable[str] | Callable[[str, nn.Conv2d], bool] | None


@dataclass
class ConversionReport:
    """What :func:`convert_model` replaced, and why it left the other convs alone."""

    conv: str
    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.replaced)} conv(s) replaced by {self.conv!r}, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  replaced {name}" for name in self.replaced]
        lines += [f"  skipped  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def conv_like(conv: nn.Conv2d, name: str, **layer_kwargs) -> nn.Module:
    """``create_conv(name, ...)`` with ``conv``'s geometry, weight, bias, device, dtype and mode.

    ``layer_kwargs`` go to the layer (e.g. ``attn_channels=4``, ``bias=True``). A bias the
    original lacks starts at zero, so it adds nothing until trained.
    """
    kwargs: dict = dict(padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                        bias=conv.bias is not None)
    if conv.padding_mode != "zeros":  # the RFA family takes no padding_mode: zeros only
        kwargs["padding_mode"] = conv.padding_mode
    kwargs.update(layer_kwargs)
    layer = create_conv(name, conv.in_channels, conv.out_channels, conv.kernel_size,
                        conv.stride, **kwargs)
    layer = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        if layer.weight.shape != conv.weight.shape:
            raise ValueError(f"{type(layer).__name__}: weight shape {tuple(layer.weight.shape)} "
                             f"differs from the conv's {tuple(conv.weight.shape)}")
        layer.weight.copy_(conv.weight)
        if getattr(layer, "bias", None) is not None:
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
            else:
                layer.bias.zero_()
    return layer.train(conv.training)


def _selector(where: Where) -> Callable[[str, nn.Conv2d], bool]:
    if where is None or callable(where):
        return where
    if isinstance(where, str):
        pattern = re.compile(where)
        return lambda name, _: pattern.fullmatch(name) is not None
    names = set(where)
    return lambda name, _: name in names


def _default_skip_reason(conv: nn.Conv2d) -> str | None:
    if conv.kernel_size == (1, 1):
        return "1x1 kernel: no receptive field to attend over"
    if conv.kernel_size != (3, 3):
        kh, kw = conv.kernel_size
        return f"{kh}x{kw} kernel: the default `where` selects 3x3 convs"
    return None


def convert_model(model: nn.Module, conv: str = "aw", where: Where = None,
                  **layer_kwargs) -> tuple[nn.Module, ConversionReport]:
    """Replace the selected nn.Conv2d modules of ``model`` (in place) by ``create_conv(conv)``.

    Weights and biases are kept (:func:`conv_like`). The default ``where`` selects every 3x3
    conv except the stem (the first conv, which sees the image: attention over three colour
    channels buys little, and both papers leave it plain). Only exact nn.Conv2d modules are
    replaced: subclasses (timm's Conv2dSame, attention convs already there) have their own
    forward, and convs inside attention convs belong to them. Convs the layer cannot express
    (grouped, dilated, unusual padding for the RFA family...) are skipped with the layer's
    reason. Returns the model and a :class:`ConversionReport`.
    """
    get_conv(conv)  # an unknown name raises here, not as a skip reason on every conv
    select = _selector(where)
    report = ConversionReport(conv)
    owned: list[str] = []  # prefixes of attention convs, whose inner convs are theirs
    stem: str | None = None
    targets: list[tuple[str, nn.Conv2d]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in owned):
            continue
        if is_attention_conv(module):
            owned.append(name)
        if not isinstance(module, nn.Conv2d):
            continue
        is_stem = stem is None
        stem = name if is_stem else stem
        if select is None:
            reason = "stem: the first conv, which sees the input" if is_stem else \
                _default_skip_reason(module)
        else:
            reason = None if select(name, module) else "not selected by `where`"
        if reason is None and type(module) is not nn.Conv2d:
            reason = f"{type(module).__name__} is not a plain nn.Conv2d"
        if reason is not None:
            report.skipped[name] = reason
        else:
            targets.append((name, module))

    for name, module in targets:
        try:
            layer = conv_like(module, conv, **layer_kwargs)
        except (ValueError, NotImplementedError) as err:
            report.skipped[name] = str(err)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        report.replaced.append(name)
    return model, report
