"""The figures and tables people look at first: what is drawn and printed, read back
from the figure or the text, not only that a file exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure as MplFigure

import attnconv.analysis.figures as viz
from attnconv import AWConv2d, create_model, get_attn
from attnconv.classification.report import (
    DOT_OFFSET,
    comparison_figure,
    difference_text,
    mean_std_text,
    training_curves_figure,
)
from attnconv.detection.coco_eval import COCO_METRICS, metrics_table

NARROW = dict(num_classes=5, channels=(8, 16, 32, 64))


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The matplotlib figures viz writes, kept for inspection after they are saved."""
    figures: list = []
    savefig = MplFigure.savefig

    def keep(fig: MplFigure, *args, **kwargs) -> None:
        figures.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(MplFigure, "savefig", keep)
    return figures


# ---- the AW figure ---------------------------------------------------------------------------

def test_kernel_mosaic_puts_each_channels_taps_in_its_own_tile() -> None:
    values = torch.arange(5 * 3 * 3, dtype=torch.float64).view(5, 3, 3)
    mosaic = viz.kernel_mosaic(values)
    assert mosaic.shape == (2 * 4 - 1, 3 * 4 - 1)  # 5 channels: 2 rows of 3 tiles, 1-px gaps
    np.testing.assert_array_equal(mosaic[0:3, 0:3], values[0])
    np.testing.assert_array_equal(mosaic[0:3, 8:11], values[2])
    np.testing.assert_array_equal(mosaic[4:7, 4:7], values[4])
    assert np.isnan(mosaic[3]).all() and np.isnan(mosaic[:, 3]).all()
    assert np.isnan(mosaic[4:7, 8:11]).all()  # no sixth channel
    assert np.isfinite(mosaic).sum() == values.numel()


def test_aw_figure_draws_cells_names_layer_and_model(tmp_path: Path, drawn: list) -> None:
    torch.manual_seed(0)
    layer = AWConv2d(4, 6, 3, padding=1)
    torch.nn.init.normal_(layer.pointconv2.weight, std=0.3)
    x = torch.randn(3, 4, 10, 10)
    figure = viz.plot_aw_attention(layer, x, tmp_path / "aw.png", filters=2,
                                   name="layer1.0.conv2", model="resnet18_aw")
    (fig,) = drawn
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 4 and {im.get_interpolation() for im in images} == {"nearest"}
    mean = (1 + layer.attention(x)).mean(0).detach()
    np.testing.assert_allclose(figure.panels["filter 1: 1+A mean"], viz.kernel_mosaic(mean[1]),
                               rtol=1e-6)
    title = fig.get_suptitle()
    assert title.startswith("resnet18_aw · layer1.0.conv2: AW kernel scaling 1+A")
    assert "untrained" not in " ".join(figure.texts)


def test_an_untrained_aw_layer_says_a_is_zero(tmp_path: Path) -> None:
    layer = AWConv2d(4, 6, 3, padding=1)  # pointconv2 starts at zero
    figure = viz.plot_aw_attention(layer, torch.randn(2, 4, 8, 8), tmp_path / "aw.png",
                                   filters=2, name="conv", model="net")
    assert any("untrained: A = 0" in text for text in figure.texts)
    np.testing.assert_array_equal(np.nan_to_num(figure.panels["filter 0: 1+A mean"], nan=1.0),
                                  1.0)


# ---- gate maps of an untrained model ---------------------------------------------------------

@pytest.mark.slow  # a ResNet-50 and two figures of many panels
def test_gate_maps_of_an_untrained_model_say_so_instead_of_a_blank_map(tmp_path: Path,
                                                                        drawn: list) -> None:
    model = create_model("resnet50_se_aw", **NARROW).eval()
    figures = {f.path.name: f for f in viz.visualize(model, tmp_path, size=32, views=2)}
    gates = figures["gate_maps.png"]
    assert gates.panels == {}  # nothing blank drawn as if it were a map
    assert gates.texts.count(viz.NO_GATE) == 6  # one note per panel (max_gates)
    assert any("resnet50_se_aw" in t for t in gates.texts)
    aw = figures["aw_attention.png"]
    assert any(t.startswith("resnet50_se_aw · layer1.0.conv2: ") for t in aw.texts)
    assert any("untrained: A = 0" in t for t in aw.texts)


def test_gate_maps_are_drawn_where_there_is_a_gate(tmp_path: Path) -> None:
    pixels, _ = viz.load_image(size=16)
    gate = torch.full((16, 16), 0.25)
    gate[:4] = float("nan")  # partly blank (input 0 there) is still drawn
    figure = viz.plot_gate_maps({"a": gate, "b": torch.full((16, 16), float("nan"))}, pixels,
                                tmp_path / "g.png", model="m")
    assert list(figure.panels) == ["a"]
    np.testing.assert_array_equal(figure.panels["a"], gate.numpy())
    assert viz.NO_GATE in figure.texts and "a" in figure.texts and "b" in figure.texts


# ---- viz reads the model's input channels -----------------------------------------------------

def test_load_image_in_grayscale() -> None:
    pixels, tensor = viz.load_image(size=24, in_chans=1)
    assert tensor.shape == (1, 1, 24, 24)
    assert abs(tensor.mean().item()) < 1e-5 and abs(tensor.std().item() - 1) < 1e-4
    assert pixels.shape == (24, 24, 3) and np.array_equal(pixels[..., 0], pixels[..., 2])
    with pytest.raises(ValueError, match="model takes 4 input channels"):
        viz.load_image(size=8, in_chans=4)


@pytest.mark.slow  # builds, saves and reloads a model, draws one figure
def test_viz_cli_on_a_one_channel_digits_checkpoint(tmp_path: Path, drawn: list,
                                                    capsys: pytest.CaptureFixture) -> None:
    from attnconv.classification.config import ClassificationConfig
    from attnconv.cli import main
    from attnconv.weights import atomic_save

    cfg = ClassificationConfig(model="resnet18_aw")
    torch.manual_seed(0)
    model = create_model("resnet18_aw", num_classes=10, in_chans=1, **cfg.model_args)
    for name, p in model.named_parameters():
        if "pointconv2" in name:
            torch.nn.init.normal_(p, std=0.1)
    atomic_save({"attnconv": {"config": cfg.to_dict(), "num_classes": 10, "in_chans": 1,
                              "image_size": 8},
                 "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
                tmp_path / "best.ckpt")
    main(["viz", "--model", "resnet18_aw", "--checkpoint", str(tmp_path / "best.ckpt"),
          "--out", str(tmp_path / "viz")])
    assert f"wrote {tmp_path / 'viz' / 'aw_attention.png'}" in capsys.readouterr().out
    (fig,) = drawn
    assert "untrained" not in fig.get_suptitle()
    assert fig.get_suptitle().startswith("resnet18_aw · layer1.0.conv1: ")


# ---- compare.png and the comparison table -----------------------------------------------------

def _bars(ax) -> list[float]:
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    return [rect.get_height() for rect in bars]


def test_compare_with_one_seed_has_no_error_bar_and_no_nan() -> None:
    fig = comparison_figure({"resnet18": [61.0], "resnet18_aw": [63.5]}, "digits, 1 seed")
    ax, delta_ax = fig.axes
    assert _bars(ax) == [61.0, 63.5]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert not [line for line in ax.lines if len(line.get_xdata())]  # no dots, no bars
    assert mean_std_text([61.0]) == "61.00"
    assert difference_text([61.0], [63.5]) == "+2.50 (one seed: no interval)"
    assert not [c for c in delta_ax.containers if isinstance(c, ErrorbarContainer)]
    assert "+2.50\n(one seed: no interval)" in [t.get_text() for t in delta_ax.texts]


def test_compare_with_several_seeds_shows_each_seed_beside_the_mean() -> None:
    top1 = {"a": [60.0, 62.0, 64.0], "b": [70.0, 71.0, 75.0]}
    fig = comparison_figure(top1)
    ax = fig.axes[0]
    assert _bars(ax) == [62.0, pytest.approx(72.0)]
    errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    spans = [seg[:, 1] for c in errorbars for seg in c.lines[2][0].get_segments()]
    np.testing.assert_allclose(spans, [[60.0, 64.0], [72 - np.std(top1["b"], ddof=1),
                                                      72 + np.std(top1["b"], ddof=1)]])
    dots = [line for line in ax.lines if line.get_marker() == "o"]
    assert [list(d.get_ydata()) for d in dots] == [top1["a"], top1["b"]]
    assert [set(d.get_xdata()) for d in dots] == [{0 + DOT_OFFSET}, {1 + DOT_OFFSET}]
    assert mean_std_text(top1["a"]) == "62.00 ± 2.00"
    assert difference_text(top1["a"], top1["b"]).startswith("+10.00 [")


def test_compare_figure_starts_at_zero_and_draws_the_tables_difference() -> None:
    from attnconv.classification.report import welch_interval

    top1 = {"resnet18": [92.78, 94.72], "resnet18_aw": [96.94, 97.50],
            "resnet18_rfa": [97.22, 97.22]}
    fig = comparison_figure(top1)
    ax, delta_ax = fig.axes
    assert ax.get_ylim() == (0, 100)  # bar lengths are the accuracies
    assert [t.get_text() for t in ax.texts] == ["93.75", "97.22", "97.22"]
    spans = [c.lines[2][0].get_segments()[0][:, 1] for c in delta_ax.containers
             if isinstance(c, ErrorbarContainer)]
    for name, span in zip(["resnet18_aw", "resnet18_rfa"], spans, strict=True):
        _, low, high = welch_interval(top1["resnet18"], top1[name])
        np.testing.assert_allclose(span, [low, high])
        text = difference_text(top1["resnet18"], top1[name])
        assert text in [t.get_text() for t in delta_ax.texts]
    low, high = delta_ax.get_ylim()
    assert low < 0 < high  # zero, "no difference", is on the axis
    assert any(line.get_ydata()[0] == 0 for line in delta_ax.lines)
    assert "vs resnet18" in delta_ax.get_ylabel()


def test_comparison_table_prints_no_nan_for_one_seed(tmp_path: Path) -> None:
    from attnconv.classification.run import RunResult, comparison_table

    def run(model: str, top1: float) -> RunResult:
        return RunResult(model, 0, top1, 99.0, 0.1, 1000, 2000, 50.0, tmp_path, None, None)

    table = comparison_table({"resnet18": [run("resnet18", 61.0)],
                              "resnet18_aw": [run("resnet18_aw", 63.5)]})
    assert "nan" not in table and "inf" not in table
    assert "| resnet18_aw | 63.50 | +2.50 (one seed: no interval) |" in table


# ---- curves.png ------------------------------------------------------------------------------

def test_training_curves_have_whole_epoch_ticks() -> None:
    metrics = {"train_loss": [(0, 2.0), (1, 1.2), (2, 0.9)],
               "val_loss": [(0, 1.8), (1, 1.1), (2, 1.0)],
               "val_top1": [(0, 0.4), (1, 0.7), (2, 0.75)]}
    fig = training_curves_figure(metrics, "resnet18")
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_ydata(), [0.4, 0.7, 0.75])


# ---- the detection table ---------------------------------------------------------------------

def test_detection_table_prints_a_dash_for_metrics_coco_cannot_compute() -> None:
    metrics = dict(zip(COCO_METRICS, (41.234, 80.0, 45.5, 30.0, 52.25, -1.0), strict=True))
    table = metrics_table({"resnet18_aw": metrics})
    row = table.splitlines()[-1]
    assert row == "| resnet18_aw | 41.2 | 80 | 45.5 | 30 | 52.2 | \u2013 |"
    assert "-1" not in table


# ---- one honest scale per figure --------------------------------------------------------------

def test_aw_panels_share_one_scale_per_row(tmp_path: Path, drawn: list) -> None:
    torch.manual_seed(0)
    layer = AWConv2d(4, 6, 3, padding=1)
    torch.nn.init.normal_(layer.pointconv2.weight, std=0.3)
    x = torch.randn(3, 4, 10, 10)
    figure = viz.plot_aw_attention(layer, x, tmp_path / "aw.png", filters=3)
    (fig,) = drawn
    images = {ax.get_title(): ax.images[0] for ax in fig.axes if ax.images}
    means = [im for title, im in images.items() if title.endswith("mean")]
    stds = [im for title, im in images.items() if title.endswith("std")]
    assert len(means) == len(stds) == 3
    assert len({(im.norm.vmin, im.norm.vmax) for im in means}) == 1
    assert len({(im.norm.vmin, im.norm.vmax) for im in stds}) == 1
    spread = max(np.nanmax(np.abs(figure.panels[f"filter {o}: 1+A mean"] - 1)) for o in range(3))
    assert means[0].norm.vcenter == 1.0
    assert means[0].norm.vmax == pytest.approx(1 + spread)  # the largest deviation, any panel
    assert stds[0].norm.vmin == 0
    assert stds[0].norm.vmax == pytest.approx(
        max(np.nanmax(figure.panels[f"filter {o}: 1+A std"]) for o in range(3)))


def test_rfa_map_diverges_from_uniform_and_says_so(tmp_path: Path, drawn: list) -> None:
    torch.manual_seed(0)
    # Near uniform, as a trained layer is: within about 1% of 1/9.
    attention = torch.softmax(0.02 * torch.randn(1, 4, 9, 6, 6), dim=2)
    pixels, _ = viz.load_image(size=24)
    viz.plot_rfa_attention(attention, pixels, tmp_path / "rfa.png")
    (fig,) = drawn
    heat = fig.axes[1].images[1]
    assert heat.norm.vcenter == pytest.approx(1 / 9)
    assert heat.norm.vmin < 1 / 9 < heat.norm.vmax
    assert heat.norm.vmax - 1 / 9 == pytest.approx(1 / 9 - heat.norm.vmin)
    assert heat.get_cmap().name == "RdBu_r"  # a diverging map
    bar_labels = [ax.get_ylabel() for ax in fig.axes]
    assert any("uniform 1/9" in label for label in bar_labels), bar_labels


def test_gate_maps_are_titled_by_what_the_module_is() -> None:
    model = create_model("resnet50_cbam", **NARROW)
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, get_attn("cbam"))]
    assert names[0] == "layer1.0.se"  # timm's attribute name for any attention
    assert viz.gate_title(names[0], modules[names[0]]) == "CBAM in layer1.0"


# ---- training speed: the models timed side by side ---------------------------------------------

class _Logged(torch.nn.Module):
    """A tiny classifier that notes each forward pass in ``calls``."""

    def __init__(self, name: str, calls: list[str]) -> None:
        super().__init__()
        self.name, self.calls = name, calls
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.name)
        return self.fc(x.flatten(1))


def test_training_speed_is_measured_with_the_models_interleaved() -> None:
    from attnconv.classification.demo import train_throughput

    calls: list[str] = []
    models = {"a": _Logged("a", calls), "b": _Logged("b", calls)}
    before = models["a"].fc.weight.detach().clone()
    speed = train_throughput(models, torch.randn(8, 1, 2, 2), torch.randint(0, 3, (8,)),
                             rounds=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then 3 rounds, alternating
    assert set(speed) == {"a", "b"} and all(v > 0 for v in speed.values())
    assert not torch.equal(models["a"].fc.weight, before)  # real steps: the weights moved


def test_speed_report_gives_the_load_it_was_measured_under(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import attnconv.classification.models as models
    from attnconv.classification.data import Datasets
    from attnconv.classification.demo import demo_config, throughput_report

    calls: list[str] = []
    monkeypatch.setattr(models, "build_model", lambda name, *a, **k: _Logged(name, calls))
    loads = iter([(1.5, 0, 0), (2.25, 0, 0)])
    monkeypatch.setattr("os.getloadavg", lambda: next(loads))
    sets = Datasets(None, None, num_classes=3, in_chans=1, image_size=2)
    text = throughput_report(["p", "q"], demo_config(), sets, rounds=2)
    assert "load average 1.5 before, 2.2 after" in text
    assert "interleaved" in text and "median of 2 rounds" in text
    assert "| p |" in text and "| q |" in text and "| 1.00 |" in text


def test_the_comparison_table_has_no_speed_of_runs_timed_apart() -> None:
    from attnconv.classification.run import COMPARE_HEADERS

    assert not [h for h in COMPARE_HEADERS if "img/s" in h]
