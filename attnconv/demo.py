"""What ``attnconv demo`` runs: the training comparison of a plain, an AW and an RFA ResNet-18
on the embedded digits (:data:`DEMO_MODELS`, :data:`DEMO_RECIPE`); and the layer comparison of
``benchmarks/bench_layers.py``, AWConv2d against the nn.Conv2d it was made from."""

from __future__ import annotations

import torch
from torch import nn

from attnconv.layers import AWConv2d
from attnconv.profiling import count_macs, count_params, forward_fn, median_times, train_step_fn

HEADERS = ("layer", "params", "MACs (M)", "fwd (ms)", "fwd+bwd (ms)", "fwd ratio",
           "fwd+bwd ratio", "max abs diff at init")


def compare_aw_with_conv(batch: int, channels: int, size: int, kernel_size: int = 3, *,
                         repeats: int = 10, seed: int = 0,
                         device: torch.device | str = "cpu",
                         other_impls: tuple[str, ...] = ()) -> list[tuple]:
    """Rows of :data:`HEADERS` for nn.Conv2d and the AWConv2d made from it (``from_conv``).

    The AWConv2d row uses the default path; ``other_impls`` adds a row per other named ``impl``.

    The AW layer's attention is then given random weights, so the timing covers real work;
    the difference column is measured before that, where it must be zero.
    """
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, device=device)
    aw = AWConv2d.from_conv(conv)
    x = torch.randn(batch, channels, size, size, device=device)
    default = aw.resolved_impl(x)
    layers: dict[str, nn.Module] = {"nn.Conv2d": conv, f"AWConv2d ({aw.impl}: {default})": aw}
    layers |= {f"AWConv2d ({impl})": AWConv2d.from_conv(conv, impl=impl)
               for impl in other_impls if impl != default}
    with torch.no_grad():
        diffs = {k: (m(x) - conv(x)).abs().max().item() for k, m in layers.items()}
        nn.init.normal_(aw.pointconv2.weight, std=0.02)
        for layer in layers.values():
            if isinstance(layer, AWConv2d):
                layer.load_state_dict(aw.state_dict())
    fwd = median_times({k: forward_fn(m, x) for k, m in layers.items()}, repeats=repeats)
    train = median_times({k: train_step_fn(m, x) for k, m in layers.items()}, repeats=repeats)
    rows = []
    for name, layer in layers.items():
        rows.append((name, count_params(layer), count_macs(layer, x) / 1e6,
                     fwd[name] * 1e3, train[name] * 1e3, fwd[name] / fwd["nn.Conv2d"],
                     train[name] / train["nn.Conv2d"], diffs[name]))
    return rows


# `attnconv demo` (recipes/demo.yaml holds the same values): the three variants of a narrow
# CIFAR-stem ResNet-18 on the digits that ship inside scikit-learn, sized for 2 CPU cores.
DEMO_MODELS = ("resnet18", "resnet18_aw", "resnet18_rfa")
DEMO_RECIPE = {
    "model_args": {"cifar_stem": True, "channels": [8, 16, 32, 64]},
    "data": {"name": "digits", "image_size": 16, "batch_size": 64, "augment": True},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
              "scheduler": "cosine", "warmup_epochs": 1},
    "trainer": {"max_epochs": 8, "accelerator": "cpu", "devices": 1, "deterministic": True,
                "log_every_n_steps": 5},
}


def demo_config(out_dir: str = "runs/demo", progress_bar: bool = False):  # -> RunConfig
    """The RunConfig of ``attnconv demo``."""
    from attnconv.training.config import RunConfig, apply

    cfg = apply(RunConfig(), {**DEMO_RECIPE, "out_dir": out_dir, "name": "compare"})
    cfg.trainer.progress_bar = progress_bar
    return cfg
