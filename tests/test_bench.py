"""The complexity table: what it counts (asserted exactly) and how it prints (never timings);
the benchmarks' harness (load guard, interleaving, headers) and every script at tiny sizes."""

from __future__ import annotations

import csv
import importlib
import io
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnconv import AWConv2d, create_model
from attnconv.analysis.complexity import ModelStats, benchmark_models, complexity_table
from attnconv.analysis.profiling import count_macs
from attnconv.cli import main


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


# --- benchmarks/: the harness and every script at tiny sizes ----------------------------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a script of benchmarks/ by name (they import their ``harness`` as a sibling)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def fake_load(monkeypatch: pytest.MonkeyPatch, load: float) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


def test_harness_refuses_to_time_under_load(bench, monkeypatch, capsys) -> None:
    fake_load(monkeypatch, 0.9)
    with pytest.raises(SystemExit, match=r"load average 0\.90 > 0\.5.*--allow-load"):
        bench("bench_rfa_fused").main(["--quick"])
    assert capsys.readouterr().out == ""  # nothing measured, nothing printed


def test_allow_load_marks_every_table_not_comparable(bench, monkeypatch, capsys) -> None:
    fake_load(monkeypatch, 1.5)
    bench("bench_digest").main(["--quick", "--rounds", "1", "--warmup", "0", "--allow-load"])
    out = capsys.readouterr().out
    titles = [line for line in out.splitlines() if line.startswith("### ")]
    assert titles and all(t.endswith("not comparable (load 1.50 before the run)")
                          for t in titles)
    assert "- **not comparable (load 1.50 before the run)**" in out
    assert f"torch {torch.__version__}" in out and "caches " in out and "CPU: " in out
    assert "load average (1 min): 1.50 before the run, 1.50 after" in out


def test_idle_machine_figures_are_not_marked(bench, monkeypatch, capsys) -> None:
    fake_load(monkeypatch, 0.2)
    bench("bench_digest").main(["--quick", "--rounds", "2", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "not comparable" not in out
    rows = [line for line in out.splitlines() if line.startswith("| save, no digest |")]
    assert rows and rows[0].endswith("| 1.00 |")  # the baseline against itself


def test_measure_alternates_the_order_and_restores_threads(bench) -> None:
    harness = bench("harness")
    calls: list[str] = []
    threads = torch.get_num_threads()
    seen: list[int] = []
    timings = harness.measure({"a": lambda: calls.append("a"),
                               "b": lambda: (calls.append("b"), seen.append(
                                   torch.get_num_threads()))},
                              rounds=2, warmup=1, threads=1)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # warm-up round, then two timed rounds
    assert {len(s) for s in timings.samples.values()} == {2}
    assert seen == [1, 1, 1] and torch.get_num_threads() == threads
    fixed = harness.Timings({"base": [1.0, 2.0, 9.0], "x": [3.0, 6.0, 4.0]})
    assert fixed.ratio("x", "base") == 2.0 and fixed.min("x") == 3.0
    with pytest.raises(ValueError, match="rounds"):
        harness.measure({"a": lambda: None}, rounds=0)


def test_cache_sizes_read_from_sysfs(bench, tmp_path) -> None:
    for index, (level, kind, size) in enumerate([("1", "Data", "48K"),
                                                 ("1", "Instruction", "32K"),
                                                 ("2", "Unified", "2048K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(value + "\n")
    cache_sizes = bench("harness").cache_sizes
    assert cache_sizes(tmp_path) == "L1d 48K, L2 2048K"
    assert cache_sizes(tmp_path / "missing") == "unknown"


def test_bench_rfa_fused_runs_at_tiny_shapes(bench, monkeypatch, capsys) -> None:
    fake_load(monkeypatch, 0.0)
    bench("bench_rfa_fused").main(["--quick", "--layers", "rfa", "--rounds", "1",
                                   "--warmup", "0", "--threads", "1", "2"])
    out = capsys.readouterr().out
    assert out.count("### rfa, input (2, 8, 8, 8)") == 2  # stride 1 and 2
    for candidate in ("conv + BN + ReLU", "official", "rfa eager", "rfa fused"):
        assert out.count(f"| {candidate} | 1 |") == 2 and out.count(f"| {candidate} | 2 |") == 2
    assert "| train speed-up |" in out


def test_bench_rfa_phases_times_every_phase_at_tiny_shapes(bench, monkeypatch, capsys) -> None:
    fake_load(monkeypatch, 0.0)
    bench("bench_rfa_phases").main(["--quick", "--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert out.count("### phases at (2, 8, 8, 8)") == 2  # stride 1 and 2
    for phase in ("GEMM floor (torch.mm)", "features pass (rfa_feature_stats)", "rfa: backward",
                  "rfcbam: product backward (tail handed on)", "rfca: reduction pass"):
        assert out.count(f"| {phase} |") == 2


def test_bench_layers_runs_at_tiny_shapes(bench, monkeypatch, capsys) -> None:
    fake_load(monkeypatch, 0.0)
    bench("bench_layers").main(["--quick", "--only", "aw", "--only", "rfa", "--rounds", "1",
                                "--warmup", "0"])
    out = capsys.readouterr().out
    assert out.count("### AWConv2d vs nn.Conv2d") == 1 and out.count("vs the faithful") == 3
    assert "| reference (official) |" in out


@pytest.mark.slow
def test_bench_models_runs_at_tiny_shapes(bench, monkeypatch, capsys) -> None:
    fake_load(monkeypatch, 0.0)
    bench("bench_models").main(["--quick", "--rounds", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    for name in ("resnet18", "resnet18_rfa", "resnet18_rfa eager"):
        assert f"| {name} | 2 |" in out  # PyTorch rows, 2 threads
    assert "### onnxruntime" in out and "| resnet18_rfa |" in out.split("### onnxruntime")[1]
