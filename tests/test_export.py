"""Export with a dynamic batch: torch.export and ONNX (checked with onnxruntime)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from attnconv import AWConv2d, create_conv, create_model
from attnconv.cli import main
from attnconv.export import ExportError, export_onnx, export_program


def aw_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(AWConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        AWConv2d(8, 8, 3, stride=2, padding=1, groups=2))
    for layer in net:
        if isinstance(layer, AWConv2d):
            nn.init.normal_(layer.pointconv2.weight, std=0.2)
    return net.eval()


def test_torch_export_keeps_the_batch_dynamic():
    net = aw_net()
    program = export_program(net, torch.randn(2, 3, 12, 12))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-5)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    # The grouped path would bake `groups = N * g` into the graph; the export uses unfold.
    assert any("im2col" in op or "unfold" in op for op in ops), ops


def test_onnx_export_verifies_on_another_batch_size(tmp_path):
    net = aw_net()
    report = export_onnx(net, tmp_path / "aw.onnx", input_size=(3, 12, 12), batch_size=2)
    assert report.verify_batch == 3 and report.max_abs_diff < 1e-4
    graph = onnx.load(str(report.path)).graph
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert "largest difference to PyTorch" in str(report)


class ExportsSomethingElse(nn.Module):
    """Adds 0.5 only while being exported: the exported graph is wrong by exactly 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (0.5 if torch.compiler.is_exporting() else 0.0)


def test_onnx_export_fails_with_the_figure_when_the_graph_is_wrong(tmp_path):
    with pytest.raises(ExportError, match=r"differs from PyTorch by 0\.5 at batch 3"):
        export_onnx(ExportsSomethingElse(), tmp_path / "bad.onnx", input_size=(3, 4, 4),
                    batch_size=2)


# --- every layer and one zoo model per family -------------------------------------------------

LAYERS = ["aw", "rfa", "rfcbam", "rfca", "camconv", "cbamconv", "caconv"]
# One per family: AW on BasicBlocks, the RFA family, an attention-then-conv baseline, and
# AW on top of activation attention in bottlenecks (resnet18_rfa goes through the CLI below).
ZOO = {"resnet18_aw": False, "resnet18_rfcbam": False, "resnet18_caconv": False,
       "resnet50_se_aw": True}
NARROW = dict(num_classes=5, cifar_stem=True, channels=(8, 16, 32, 64))


def trained_like(module: nn.Module) -> nn.Module:
    """Random attention parameters and BN statistics, so the export is checked on a layer that
    does something (AW's Pointconv2 and BN running stats start at trivial values)."""
    torch.manual_seed(0)
    module.train()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pointconv2" in name:
                p.normal_(0, 0.1)
        module(torch.randn(4, *next_input_shape(module)))  # BN running statistics
    return module.eval()


def next_input_shape(module: nn.Module) -> tuple[int, int, int]:
    first = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    return (first.in_channels, 16, 16)


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_exports_with_a_dynamic_batch(name, tmp_path):
    layer = trained_like(create_conv(name, 4, 6, 3, 2, padding=1))
    program = export_program(layer, torch.randn(2, 4, 16, 16))
    x = torch.randn(3, 4, 16, 16)
    torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-5, atol=1e-5)
    report = export_onnx(layer, tmp_path / f"{name}.onnx", input_size=(4, 16, 16))
    assert report.max_abs_diff < 1e-4


@pytest.mark.parametrize("name", ["rfa", "rfcbam", "rfca"])
def test_rfa_layers_export_with_the_batchnorm_folded(name):
    layer = trained_like(create_conv(name, 4, 6, 3, 1))
    program = export_program(layer, torch.randn(2, 4, 16, 16))
    norm_widths = [node.args[0].meta["val"].shape[1] for node in program.graph.nodes
                   if "batch_norm" in str(node.target)]
    # RFCA's coordinate attention keeps its own BN over `mip` channels; none may act on the
    # C * k^2 receptive-field features.
    assert 4 * 9 not in norm_widths
    assert norm_widths == ([layer.coord_bn.num_features] if name == "rfca" else [])


@pytest.mark.parametrize("name", ["rfa", "rfcbam", "rfca"])
@pytest.mark.parametrize("stride", [1, 2])
def test_rfa_layers_exported_formulation_equals_eager_in_float64(name, stride, monkeypatch):
    layer = trained_like(create_conv(name, 4, 6, 3, stride, impl="eager")).double()
    with torch.no_grad():  # logits large enough that an unshifted exp would overflow
        if name == "rfa":
            layer.attn_logit_scale.mul_(5000.0)
    x = torch.randn(3, 4, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        eager = layer(x)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        exported = layer(x)
    assert torch.isfinite(exported).all()
    torch.testing.assert_close(exported, eager, rtol=1e-12, atol=1e-12)


def onnx_nodes(layer: nn.Module, path) -> tuple[list[onnx.NodeProto], dict[str, int]]:
    """The nodes of ``layer``'s ONNX export and the rank of every value they make."""
    export_onnx(layer, path, input_size=(4, 16, 16))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    return list(model.graph.node), ranks


def test_rfaconv_exports_without_softmax_or_5d_tensors(tmp_path):
    # onnxruntime's Softmax over a middle axis transposes the k2-sized tensor there and back
    nodes, ranks = onnx_nodes(trained_like(create_conv("rfa", 4, 6, 3, 1)), tmp_path / "a.onnx")
    assert "Softmax" not in {node.op_type for node in nodes}
    assert max(ranks.values()) == 4


@pytest.mark.parametrize("name", ["rfa", "rfcbam", "rfca"])
def test_rfa_layers_export_the_relu_right_after_the_depthwise_conv(name, tmp_path):
    # what onnxruntime fuses into one conv
    nodes, _ = onnx_nodes(trained_like(create_conv(name, 4, 6, 3, 1)), tmp_path / "a.onnx")
    depthwise = [node for node in nodes if node.op_type == "Conv"
                 and any(a.name == "group" and a.i == 4 for a in node.attribute)]
    assert len(depthwise) == 1
    consumers = [node.op_type for node in nodes if depthwise[0].output[0] in node.input]
    assert consumers == ["Relu"]


@pytest.mark.slow
@pytest.mark.parametrize("name,onnx_too", ZOO.items())
def test_zoo_models_export(name, onnx_too, tmp_path):
    model = trained_like(create_model(name, **NARROW))
    x = torch.randn(3, 3, 16, 16)
    program = export_program(model, torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)
    if onnx_too:
        report = export_onnx(model, tmp_path / f"{name}.onnx", input_size=(3, 16, 16))
        assert report.max_abs_diff < 1e-4


# --- the command ---------------------------------------------------------------------------------

def test_cli_exports_a_zoo_model(tmp_path, capsys):
    out = tmp_path / "r18.onnx"
    main(["export", "resnet18_rfa", "--input-size", "3", "32", "32", "--num-classes", "3",
          "--output", str(out)])
    assert "largest difference to PyTorch" in capsys.readouterr().out
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3


def test_cli_exports_a_state_dict_checkpoint_and_refuses_a_mismatch(tmp_path, capsys):
    model = create_model("resnet18_aw", num_classes=4)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    main(["export", "resnet18_aw", "--checkpoint", str(tmp_path / "w.pt"), "--num-classes", "4",
          "--input-size", "3", "32", "32", "--output", str(tmp_path / "w.onnx")])
    assert (tmp_path / "w.onnx").stat().st_size > 1e6
    with pytest.raises(SystemExit) as exit_info:  # a refusal: one line, exit status 2
        main(["export", "resnet18_rfa", "--checkpoint", str(tmp_path / "w.pt"),
              "--num-classes", "4", "--output", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2
    assert "does not fit 'resnet18_rfa'" in capsys.readouterr().err
