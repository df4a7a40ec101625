"""Pictures of what the attention does, for one input image (matplotlib, PNG files).

* RFA family (Zhang et al., arXiv:2304.03198): the k x k receptive-field attention of every
  output position, laid out as the paper's rearranged map (each position a k x k tile) over
  the image.
* AW-convolution (Zhu et al., ICANN 2021, arXiv:2108.08205): per output filter, the kernel's
  scaling ``1 + A`` over taps and input channels, averaged over a batch of views of the image,
  and its standard deviation across that batch.
* Activation attention (SE, CBAM, CA, ...): the effective gate ``output / input`` of the
  module, averaged over channels, over the image.

Each ``plot_*`` function returns the arrays it drew, read back from the figure, so tests can
check that the picture shows the layer's actual attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Figure:
    """A written PNG and the arrays drawn in it, by panel title."""
    path: Path
    panels: dict[str, np.ndarray] = field(default_factory=dict)


def default_image_path() -> Path:
    """Grace Hopper's portrait, shipped inside matplotlib: needs no download."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def load_image(path: str | Path | None = None, size: int = 224) -> tuple[np.ndarray, torch.Tensor]:
    """The image as (size, size, 3) floats in [0, 1] and as a normalised (1, 3, size, size)
    tensor (ImageNet mean/std, as the zoo's pretrained_cfg)."""
    from PIL import Image
    from torchvision.transforms import v2

    path = default_image_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    to_tensor = v2.Compose([v2.PILToTensor(), v2.Resize(size), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True)])
    pixels = to_tensor(Image.open(path).convert("RGB"))
    normalised = v2.functional.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
    return pixels.permute(1, 2, 0).numpy(), normalised.unsqueeze(0)


def augmented_batch(image: torch.Tensor, n: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` random flips and crops of one (1, 3, H, W) image, resized back to H x W: a batch
    over which to measure how much a per-sample attention varies."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    size = image.shape[-2:]
    views = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                        v2.RandomHorizontalFlip()])
    return torch.cat([image] + [views(image) for _ in range(n - 1)])


def _save(fig, path: Path, panels: dict[str, np.ndarray]) -> Figure:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Figure(path, panels)


def _subplots(rows: int, cols: int, size: float = 2.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


@torch.no_grad()
def plot_aw_attention(layer: nn.Module, x: torch.Tensor, path: str | Path, *,
                      filters: int = 8) -> Figure:
    """For the first ``filters`` output filters of an AWConv2d: the kernel scaling ``1 + A``
    (rows: input channels, columns: the kh*kw taps), mean over the batch ``x`` and its standard
    deviation across the batch."""
    scale = 1 + layer.attention(x).float()  # (N, O, C_in/g, kh, kw)
    scale = scale.flatten(3)[:, :filters].cpu()
    mean, std = scale.mean(0), scale.std(0) if scale.shape[0] > 1 else torch.zeros_like(scale[0])
    from matplotlib.colors import CenteredNorm

    fig, axes = _subplots(2, mean.shape[0])
    panels = {}
    for o in range(mean.shape[0]):
        for row, (label, values, cmap, norm) in enumerate((
                ("1+A mean", mean[o], "coolwarm", CenteredNorm(vcenter=1.0)),
                ("1+A std", std[o], "viridis", None))):
            im = axes[row, o].imshow(values.numpy(), cmap=cmap, norm=norm, aspect="auto")
            axes[row, o].set_title(f"filter {o}: {label}", fontsize=7)
            fig.colorbar(im, ax=axes[row, o], fraction=0.046)
            panels[f"filter {o}: {label}"] = np.asarray(im.get_array())
    axes[0, 0].set_ylabel("input channel")
    axes[1, 0].set_xlabel("tap (row-major)")
    fig.suptitle(f"AW attention over a batch of {x.shape[0]} views", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path), panels)


def rfa_tiles(attention: torch.Tensor) -> torch.Tensor:
    """(N, C, k*k, H', W') receptive-field attention, mean over channels, laid out as the
    paper's (H'*k, W'*k) map: tap i*k + j of position (h, w) at row h*k + i, column w*k + j."""
    n, _, taps, height, width = attention.shape
    k = round(taps ** 0.5)
    mean = attention.float().mean(1).view(n, k, k, height, width)
    return mean.permute(0, 3, 1, 4, 2).reshape(n, height * k, width * k)


@torch.no_grad()
def plot_rfa_attention(attention: torch.Tensor, image: np.ndarray, path: str | Path,
                       title: str = "receptive-field attention") -> Figure:
    """The first sample's receptive-field attention (from the layer's ``attention(x)``) as a
    heat-map grid of k x k tiles over ``image``."""
    tiles = rfa_tiles(attention)[0].cpu().numpy()
    fig, axes = _subplots(1, 2, size=4.0)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].imshow(image)
    extent = (0, image.shape[1], image.shape[0], 0)
    im = axes[0, 1].imshow(tiles, cmap="magma", alpha=0.7, extent=extent, interpolation="nearest")
    axes[0, 1].set_title(title, fontsize=8)
    fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
    fig.tight_layout()
    return _save(fig, Path(path), {title: np.asarray(im.get_array())})


def effective_gate(inputs: torch.Tensor, outputs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spatial map of an activation-attention module's gate: mean over channels of
    output / input where the input is not ~0, per sample -> (N, H, W). Positions whose input
    is ~0 in every channel (e.g. after a zero-initialised BN) have no gate to show: NaN, which
    the figures leave blank."""
    valid = inputs.abs() > eps
    ratio = torch.where(valid, outputs / torch.where(valid, inputs, 1.0), 0.0)
    count = valid.sum(1)
    return torch.where(count > 0, ratio.sum(1) / count.clamp(min=1), float("nan"))


@torch.no_grad()
def plot_gate_maps(maps: dict[str, torch.Tensor], image: np.ndarray, path: str | Path) -> Figure:
    """Each (H, W) gate map, by module name, over ``image``."""
    fig, axes = _subplots(1, len(maps), size=3.0)
    extent = (0, image.shape[1], image.shape[0], 0)
    panels = {}
    for ax, (name, values) in zip(axes[0], maps.items(), strict=True):
        ax.imshow(image)
        im = ax.imshow(values.float().cpu().numpy(), cmap="magma", alpha=0.6, extent=extent)
        ax.set_title(name, fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
        panels[name] = np.asarray(im.get_array())
    fig.tight_layout()
    return _save(fig, Path(path), panels)


def _attention_kinds() -> dict[str, tuple[type, ...]]:
    from attnconv.layers import AWConv2d
    from attnconv.layers.create import ATTN_LAYERS
    from attnconv.layers.rfa_conv import RFAConv2d, RFCAConv2d, RFCBAMConv2d

    return {"aw": (AWConv2d,), "rfa": (RFAConv2d, RFCBAMConv2d, RFCAConv2d),
            "gate": tuple(cls for cls in ATTN_LAYERS.values() if isinstance(cls, type))}


@torch.no_grad()
def visualize(model: nn.Module, out_dir: str | Path, *, image: str | Path | None = None,
              size: int | None = None, layer: str | None = None, views: int = 8,
              max_gates: int = 6) -> list[Figure]:
    """Write the attention figures of ``model`` for one image into ``out_dir``.

    ``layer`` names the module to show (default: the first AW and the first RFA-family layer,
    and up to ``max_gates`` activation-attention modules spread over the depth). AW's spread
    is measured over ``views`` flips and crops of the image.
    """
    kinds = _attention_kinds()
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        raise ValueError(f"model has no module {layer!r}; attention layers: "
                         f"{[n for n, m in modules.items() if _kind(m, kinds)]}")
    chosen = {kind: [n for n, m in modules.items() if isinstance(m, types)
                     and (layer is None or n == layer)] for kind, types in kinds.items()}
    gates = chosen["gate"]
    chosen["gate"] = gates[::max(1, -(-len(gates) // max_gates))][:max_gates]
    if not any(chosen.values()):
        raise ValueError(f"{type(model).__name__} has no AW, RFA-family or activation-attention "
                         f"layer{'' if layer is None else f' named {layer!r}'} to visualise")
    size = size or _input_size(model)
    pixels, tensor = load_image(image, size)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels == 1:  # a grayscale model (digits)
        tensor = tensor.mean(dim=1, keepdim=True)
    device = next(model.parameters()).device
    batch = augmented_batch(tensor, views).to(device)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    wanted = {n for names in (chosen["aw"][:1], chosen["rfa"][:1], chosen["gate"])
              for n in names}
    hooks = [modules[n].register_forward_hook(
        lambda m, args, out, n=n: captured.__setitem__(n, (args[0], out))) for n in wanted]
    try:
        model.eval()(batch)
    finally:
        for hook in hooks:
            hook.remove()
    out_dir = Path(out_dir)
    figures = []
    for name in chosen["aw"][:1]:
        figures.append(plot_aw_attention(modules[name], captured[name][0],
                                         out_dir / "aw_attention.png"))
    for name in chosen["rfa"][:1]:
        attention = modules[name].receptive_field_attention(captured[name][0][:1])
        figures.append(plot_rfa_attention(attention, pixels, out_dir / "rfa_attention.png",
                                          title=f"{name}: receptive-field attention"))
    if chosen["gate"]:
        maps = {n: effective_gate(*captured[n])[0] for n in chosen["gate"]}
        figures.append(plot_gate_maps(maps, pixels, out_dir / "gate_maps.png"))
    return figures


def _kind(module: nn.Module, kinds: dict[str, tuple[type, ...]]) -> str | None:
    return next((k for k, types in kinds.items() if isinstance(module, types)), None)


def _input_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])
