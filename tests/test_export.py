"""Export with a dynamic batch: torch.export and ONNX (checked with onnxruntime)."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from attnconv import AWConv2d
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
