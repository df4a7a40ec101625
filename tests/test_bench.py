"""The complexity table: what it counts (asserted exactly) and how it prints (never timings)."""

from __future__ import annotations

import csv
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnconv import AWConv2d, create_model
from attnconv.bench import ModelStats, benchmark_models, complexity_table
from attnconv.cli import main
from attnconv.profiling import count_macs


def test_macs_count_per_sample_grouped_aw_convs() -> None:
    n, c_in, c_out, r, size = 3, 8, 16, 4, 10
    layer = AWConv2d(c_in, c_out, 3, padding=1, attn_channels=r)
    conv = n * size * size * c_out * c_in * 9
    pointconvs = n * 9 * (c_in * r + r * c_out * c_in)  # on the 3x3 pooled map
    assert count_macs(layer, torch.randn(n, c_in, size, size)) == conv + pointconvs
    unfold = AWConv2d(c_in, c_out, 3, padding=1, attn_channels=r, impl="unfold")
    assert count_macs(unfold, torch.randn(n, c_in, size, size)) == conv + pointconvs


def test_macs_count_functional_convs() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 2, 3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.weight, padding=1, groups=2)

    assert count_macs(Functional(), torch.randn(2, 4, 5, 5)) == 2 * 25 * 6 * 2 * 9


def test_resnet18_macs_against_the_published_figure() -> None:
    # RFAConv README: ResNet18 1.82 GFLOPs (thop) at 224x224. flop_counter counts convs and the
    # fc only; thop adds BatchNorm and pooling ops (~0.005-0.01 G here), hence 1.814 vs 1.82.
    macs = count_macs(create_model("resnet18").eval(), torch.randn(1, 3, 224, 224))
    assert macs == 1_814_073_344  # convs 1,813,561,344 + fc 512,000


def test_benchmark_models_counts_and_ratios() -> None:
    stats = benchmark_models(["resnet18", "resnet18_aw"], (3, 32, 32), 2, repeats=1, warmup=0,
                             num_classes=10, progress=False, channels=(8, 16, 32, 64))
    plain, aw = stats
    assert plain.params == sum(p.numel() for p in create_model(
        "resnet18", num_classes=10, channels=(8, 16, 32, 64)).parameters())
    assert aw.params > plain.params and aw.macs > plain.macs
    assert plain.memory_bytes > 0 and aw.images_per_second > 0 and aw.train_step_seconds > 0
    text = complexity_table(stats)
    assert text.splitlines()[0].startswith("| model | params (M) | x | MACs (G) | x |")
    assert text.splitlines()[2].startswith(f"| resnet18 | {plain.params / 1e6:.2f} | 1 |")


def test_table_formats_and_ratios() -> None:
    stats = [ModelStats("a", 2_000_000, 1_000_000_000, 100.0, 0.5, 2**20),
             ModelStats("b", 3_000_000, 1_500_000_000, 50.0, 1.0, 3 * 2**20)]
    rows = list(csv.reader(io.StringIO(complexity_table(stats, "csv"))))
    assert rows[0][:3] == ["model", "params (M)", "x"]
    assert rows[2] == ["b", "3", "1.5", "1.5", "1.5", "50", "0.5", "1000", "2", "3", "3"]
    markdown = complexity_table(stats, memory="saved for backward (MB)").splitlines()
    assert markdown[0].endswith("| saved for backward (MB) | x |")
    assert markdown[3] == "| b | 3.00 | 1.5 | 1.50 | 1.5 | 50 | 0.5 | 1000 | 2 | 3 | 3 |"
    with pytest.raises(ValueError, match="format"):
        complexity_table(stats, "json")


def test_cli_bench_prints_csv(capsys: pytest.CaptureFixture[str]) -> None:
    main(["bench", "resnet18", "--input-size", "3", "32", "32", "--batch-size", "2",
          "--repeats", "1", "--num-classes", "10", "--format", "csv"])
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert [row[0] for row in rows] == ["model", "resnet18"]
    assert float(rows[1][1]) == pytest.approx(11.18, abs=0.01)  # 1000 -> 10 classes
