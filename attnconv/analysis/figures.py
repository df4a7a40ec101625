"""Pictures of what the attention does, for one input image (matplotlib, PNG files).

* RFA family (Zhang et al., arXiv:2304.03198): the k x k receptive-field attention of every
  output position, laid out as the paper's rearranged map (each position a k x k tile) over
  the image.
* AW-convolution (Zhu et al., ICANN 2021, arXiv:2108.08205): per output filter, the kernel's
  scaling ``1 + A``, averaged over a batch of views of the image, and its standard deviation
  across that batch; each input channel is a k x k tile of cells (no interpolation). An
  untrained AW layer has A = 0 exactly (its last 1x1 conv starts at zero), and says so.
* Activation attention (SE, CBAM, CA, ...): the effective gate ``output / input`` of the
  module, averaged over channels, over the image. In an untrained zoo ResNet the input of these
  modules is 0 everywhere (the block's last BN starts at zero), so there is no gate to draw:
  the panel says so.

Each ``plot_*`` function returns the arrays it drew, read back from the figure, and every text
drawn in it, so tests can check that the picture shows the layer's actual attention.
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
    """A written PNG, the arrays drawn in it by panel title, and its texts (titles, notes)."""
    path: Path
    panels: dict[str, np.ndarray] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


def default_image_path() -> Path:
    """Grace Hopper's portrait, shipped inside matplotlib: needs no download."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def load_image(path: str | Path | None = None, size: int = 224, in_chans: int = 3
               ) -> tuple[np.ndarray, torch.Tensor]:
    """The image as (size, size, 3) floats in [0, 1] for display and as the normalised
    (1, in_chans, size, size) input of a model.

    Three channels: RGB with ImageNet mean/std, as the zoo's pretrained_cfg. One channel
    (models trained on the digits): grayscale standardised to mean 0, std 1 over the image,
    as the digits pipeline standardises its images; the display copy is that gray in RGB.
    """
    from PIL import Image
    from torchvision.transforms import v2

    if size < 1:
        raise ValueError(f"size must be >= 1 (the side of the square image), not {size}")
    if in_chans not in (1, 3):
        raise ValueError(f"viz reads RGB or grayscale images; the model takes {in_chans} "
                         "input channels")
    path = default_image_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    to_tensor = v2.Compose([v2.PILToTensor(), v2.Resize(size), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True)])
    try:
        with Image.open(path) as image:
            pixels = to_tensor(image.convert("RGB" if in_chans == 3 else "L"))
    # PIL's UnidentifiedImageError (not an image) and truncated files are OSErrors; ultralytics,
    # once imported, patches Image.open to try HEIF, which raises ImportError without pi_heif.
    except (OSError, ImportError) as err:
        cause = err.__context__ if isinstance(err, ImportError) and err.__context__ else err
        raise ValueError(f"cannot read image {path}: {type(cause).__name__}: {cause}") from None
    if in_chans == 3:
        normalised = v2.functional.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
    else:
        normalised = (pixels - pixels.mean()) / pixels.std().clamp(min=1e-6)
    return pixels.expand(3, -1, -1).permute(1, 2, 0).numpy(), normalised.unsqueeze(0)


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
    from matplotlib.text import Text

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    texts = [t.get_text() for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
    plt.close(fig)
    return Figure(path, panels, texts)


def _subplots(rows: int, cols: int, size: float = 2.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def kernel_mosaic(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, kh, kw) per-input-channel kernels as one image of k x k tiles, channel c at tile
    row c // cols, column c % cols (cols = ceil(sqrt(C))), tiles separated by a NaN line
    (drawn blank) so that every kernel's grid stays visible."""
    values = np.asarray(values, dtype=np.float64)
    channels, kh, kw = values.shape
    cols = int(np.ceil(np.sqrt(channels)))
    rows = -(-channels // cols)
    mosaic = np.full((rows * (kh + 1) - 1, cols * (kw + 1) - 1), np.nan)
    for c in range(channels):
        r, q = divmod(c, cols)
        mosaic[r * (kh + 1):r * (kh + 1) + kh, q * (kw + 1):q * (kw + 1) + kw] = values[c]
    return mosaic


@torch.no_grad()
def plot_aw_attention(layer: nn.Module, x: torch.Tensor, path: str | Path, *,
                      filters: int = 8, name: str = "", model: str = "") -> Figure:
    """For the first ``filters`` output filters of an AWConv2d: the kernel scaling ``1 + A``,
    mean over the batch ``x`` and its standard deviation across the batch, each input channel
    a k x k tile (:func:`kernel_mosaic`). ``name`` / ``model`` (the layer and the network)
    go into the title, and an attention that is exactly zero is called untrained."""
    attention = layer.attention(x).float()  # (N, O, C_in/g, kh, kw)
    untrained = not bool(attention.any())
    scale = (1 + attention)[:, :filters].cpu()
    mean = scale.mean(0)
    std = scale.std(0) if scale.shape[0] > 1 else torch.zeros_like(mean)
    from matplotlib.colors import CenteredNorm, Normalize

    # One scale per row, shared by every filter, so that colours compare across panels.
    spread = float((mean - 1).abs().max())
    rows = (("1+A mean", mean, "coolwarm", CenteredNorm(vcenter=1.0, halfrange=spread or 1e-6),
             "1+A (white: 1, the conv's own weight)"),
            ("1+A std", std, "viridis", Normalize(0.0, float(std.max()) or 1e-6),
             "std of 1+A over the views"))
    fig, axes = _subplots(2, mean.shape[0])
    fig.set_layout_engine("constrained")  # room for the colour bar each row shares
    panels = {}
    for row, (label, values, cmap, norm, bar_label) in enumerate(rows):
        for o in range(mean.shape[0]):
            im = axes[row, o].imshow(kernel_mosaic(values[o]), cmap=cmap, norm=norm,
                                     interpolation="nearest")
            axes[row, o].set_title(f"filter {o}: {label}", fontsize=7)
            panels[f"filter {o}: {label}"] = np.asarray(im.get_array())
        bar = fig.colorbar(im, ax=list(axes[row]), fraction=0.02)
        bar.set_label(bar_label, fontsize=7)
    kh, kw = mean.shape[-2:]
    axes[0, 0].set_ylabel(f"input channels, {kh}x{kw} taps each", fontsize=7)
    where = " · ".join(part for part in (model, name) if part)
    title = (f"{where + ': ' if where else ''}AW kernel scaling 1+A over a batch of "
             f"{x.shape[0]} views")
    if untrained:
        title += "\nuntrained: A = 0 (the attention's last 1x1 conv is still zero)"
    fig.suptitle(title, fontsize=9)
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
                       title: str = "receptive-field attention", model: str = "") -> Figure:
    """The first sample's receptive-field attention (from the layer's ``attention(x)``) as a
    heat-map grid of k x k tiles over ``image``; ``model`` names the network in the title.

    The colour map diverges from the uniform weight 1/k² (white): red taps get more than an
    even share of their receptive field, blue ones less, on a scale symmetric around it."""
    from matplotlib.colors import CenteredNorm

    tiles = rfa_tiles(attention)[0].cpu().numpy()
    taps = attention.shape[2]
    uniform = 1.0 / taps
    fig, axes = _subplots(1, 2, size=4.0)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].imshow(image)
    extent = (0, image.shape[1], image.shape[0], 0)
    norm = CenteredNorm(vcenter=uniform, halfrange=float(np.abs(tiles - uniform).max()) or 1e-6)
    im = axes[0, 1].imshow(tiles, cmap="RdBu_r", norm=norm, alpha=0.8, extent=extent,
                           interpolation="nearest")
    axes[0, 1].set_title(title, fontsize=8)
    bar = fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
    bar.set_label(f"attention weight (white: uniform 1/{taps} = {uniform:.4f})", fontsize=7)
    if model:
        fig.suptitle(model, fontsize=9)
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


#: What a gate panel says instead of a map when the module's input is 0 everywhere.
NO_GATE = ("untrained: the input is 0 everywhere\n(zero-initialised BN),\n"
           "so there is no gate to show")


@torch.no_grad()
def plot_gate_maps(maps: dict[str, torch.Tensor], image: np.ndarray, path: str | Path,
                   model: str = "") -> Figure:
    """Each (H, W) gate map, by panel title (:func:`gate_title`), over ``image``. A map
    without any value (its
    module's input was 0 everywhere, see :func:`effective_gate`) is not drawn: the panel
    shows the image and :data:`NO_GATE`."""
    fig, axes = _subplots(1, len(maps), size=3.0)
    extent = (0, image.shape[1], image.shape[0], 0)
    panels = {}
    for ax, (name, values) in zip(axes[0], maps.items(), strict=True):
        values = values.float().cpu().numpy()
        ax.set_title(name, fontsize=7)
        if np.isnan(values).all():
            ax.imshow(image, alpha=0.3)
            ax.text(0.5, 0.5, NO_GATE, transform=ax.transAxes, ha="center", va="center",
                    fontsize=7, wrap=True)
            continue
        ax.imshow(image)
        im = ax.imshow(values, cmap="magma", alpha=0.6, extent=extent)
        fig.colorbar(im, ax=ax, fraction=0.046)
        panels[name] = np.asarray(im.get_array())
    fig.suptitle(f"{model + ': ' if model else ''}effective gate output / input, mean over "
                 "channels", fontsize=9)
    fig.tight_layout()
    return _save(fig, Path(path), panels)


def gate_title(name: str, module: nn.Module) -> str:
    """What an activation-attention module is and where: ``'CBAM in layer1.0'`` for timm's
    ``layer1.0.se`` slot holding a CBAM module (its factory name in ``create_attn``)."""
    from attnconv.layers.create import ATTN_LAYERS

    kind = next((k.upper() for k, cls in ATTN_LAYERS.items() if type(module) is cls),
                type(module).__name__)
    block = name.rpartition(".")[0]
    return f"{kind} in {block}" if block else kind


def _attention_kinds() -> dict[str, tuple[type, ...]]:
    """The layer classes each figure draws ('aw', 'rfa', 'gate'); under 'conv', every attention
    conv, so that the ones no figure draws are still listed."""
    from attnconv.layers import ATTN_LAYERS, CONV_LAYERS, AWConv2d
    from attnconv.layers.base import AttentionConv2d

    convs = {getattr(f, "func", f) for f in CONV_LAYERS.values()}  # a partial's class too
    rfa = tuple(c for c in convs if isinstance(c, type) and hasattr(c, "receptive_field_attention"))
    return {"aw": (AWConv2d,), "rfa": rfa,
            "gate": tuple(cls for cls in ATTN_LAYERS.values() if isinstance(cls, type)),
            "conv": (AttentionConv2d,)}


@torch.no_grad()
def visualize(model: nn.Module, out_dir: str | Path, *, image: str | Path | None = None,
              size: int | None = None, layer: str | None = None, views: int = 8,
              max_gates: int = 6, model_name: str | None = None) -> list[Figure]:
    """Write the attention figures of ``model`` for one image into ``out_dir``.

    ``layer`` names the module to show (default: the first AW and the first RFA-family layer,
    and up to ``max_gates`` activation-attention modules spread over the depth). AW's spread
    is measured over ``views`` flips and crops of the image. The image is read with the
    model's number of input channels (grayscale for one-channel models). ``model_name`` goes
    into the titles (default: the zoo's architecture name).
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 (the side of the square image), not {size}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"out {out_dir} is a file; viz writes its figures into a folder")
    kinds = _attention_kinds()
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        raise ValueError(f"model has no module {layer!r}; attention layers: "
                         f"{[n for n, m in modules.items() if _kind(m, kinds)]}")
    chosen = {kind: [n for n, m in modules.items() if isinstance(m, types)
                     and (layer is None or n == layer)] for kind, types in kinds.items()}
    gates = chosen["gate"]
    chosen["gate"] = gates[::max(1, -(-len(gates) // max_gates))][:max_gates]
    if not any(chosen[kind] for kind in ("aw", "rfa", "gate")):
        raise ValueError(f"{type(model).__name__} has no AW, RFA-family or activation-attention "
                         f"layer{'' if layer is None else f' named {layer!r}'} to visualise")
    size = size or _input_size(model)
    model_name = model_name or _model_name(model)
    pixels, tensor = load_image(image, size, _input_chans(model))
    device = next(model.parameters()).device
    batch = augmented_batch(tensor, views).to(device)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    wanted = {n for names in (chosen["aw"][:1], chosen["rfa"][:1], chosen["gate"])
              for n in names}
    # Copies: a residual block adds its shortcut in place into what its last module returned.
    hooks = [modules[n].register_forward_hook(
        lambda m, args, out, n=n: captured.__setitem__(n, (args[0].clone(), out.clone())))
        for n in wanted]
    try:
        model.eval()(batch)
    finally:
        for hook in hooks:
            hook.remove()
    out_dir = Path(out_dir)
    figures = []
    for name in chosen["aw"][:1]:
        figures.append(plot_aw_attention(modules[name], captured[name][0],
                                         out_dir / "aw_attention.png", name=name,
                                         model=model_name))
    for name in chosen["rfa"][:1]:
        attention = modules[name].receptive_field_attention(captured[name][0][:1])
        figures.append(plot_rfa_attention(attention, pixels, out_dir / "rfa_attention.png",
                                          title=f"{name}: receptive-field attention",
                                          model=model_name))
    if chosen["gate"]:
        maps = {gate_title(n, modules[n]): effective_gate(*captured[n])[0]
                for n in chosen["gate"]}
        figures.append(plot_gate_maps(maps, pixels, out_dir / "gate_maps.png",
                                      model=model_name))
    return figures


def _kind(module: nn.Module, kinds: dict[str, tuple[type, ...]]) -> str | None:
    return next((k for k, types in kinds.items() if isinstance(module, types)), None)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _input_chans(model: nn.Module) -> int:
    """The channels the model reads: timm's ``in_chans``, else the first conv's input."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int):
        return chans
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _input_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])
