"""Export with a dynamic batch axis: ``torch.export`` programs and ONNX files checked by
onnxruntime.

Per-sample kernels (AW-convolution) usually freeze the batch size into an exported graph,
because ONNX conv groups are static. ``AWConv2d`` switches to its batch-agnostic unfold path
while exporting, so every layer and zoo model here exports with a symbolic batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

#: Largest |ONNX - PyTorch| accepted in float32 before an export is declared broken.
DEFAULT_ATOL = 1e-4
#: Opsets written as asked: torch's exporter builds opset 18 graphs and converts them up to its
#: newest opset; a conversion down to an older one fails for common ops (ReduceMean's axes).
OPSETS = range(18, 24)


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    example_batch: int
    verify_batch: int
    max_abs_diff: float

    def __str__(self) -> str:
        return (f"wrote {self.path} (dynamic batch; traced at batch {self.example_batch}); "
                f"onnxruntime at batch {self.verify_batch}: largest difference to PyTorch "
                f"{self.max_abs_diff:.3g}")


def _batch_dim() -> dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch", min=1, max=65536)}


def _tensors(output: object) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested lists/tuples/dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, list | tuple):
        return [t for item in output for t in _tensors(item)]
    raise TypeError(f"cannot export a model returning {type(output).__name__}")


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode with a dynamic batch dimension."""
    model.eval()
    return torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),), strict=False)


def check_export_args(path: str | Path, input_size: tuple[int, ...], batch_size: int,
                      opset: int | None) -> None:
    """ValueError naming the argument of :func:`export_onnx` that cannot give a file."""
    if len(input_size) != 3 or any(not isinstance(n, int) or n < 1 for n in input_size):
        raise ValueError(f"input_size must be 3 numbers >= 1 (channels, height, width), not "
                         f"{' '.join(map(str, input_size))}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if opset is not None and opset not in OPSETS:
        raise ValueError(f"opset must be {OPSETS.start} to {OPSETS.stop - 1} (what the exporter "
                         f"writes as asked), not {opset}")
    if Path(path).is_dir():
        raise ValueError(f"output path {path} is a folder; give the ONNX file to write, such as "
                         f"{Path(path) / 'model.onnx'}")


def export_onnx(model: nn.Module, path: str | Path, *,
                input_size: tuple[int, int, int] = (3, 224, 224), batch_size: int = 2,
                opset: int | None = None, atol: float = DEFAULT_ATOL,
                verify: bool = True) -> ExportReport:
    """Write ``model`` (eval mode) to ONNX with a dynamic batch axis and check it.

    The check runs the file in onnxruntime on a batch of ``batch_size + 1`` random inputs,
    a size the graph was not traced with, and raises :class:`ExportError` with the figure
    when the largest difference to PyTorch exceeds ``atol``. Arguments that cannot give a file
    (:func:`check_export_args`) raise ValueError before anything is traced.
    """
    check_export_args(path, input_size, batch_size, opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.randn(batch_size, *input_size, device=device)
    kwargs = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(model, (example,), str(path), dynamic_shapes=(_batch_dim(),), dynamo=True,
                      external_data=False, verbose=False, **kwargs)
    written = _opset(path)
    if opset is not None and written != opset:  # the exporter keeps its own when converting fails
        path.unlink()
        raise ExportError(f"the exporter could not write opset {opset} (it wrote {written}); "
                          f"use opset {written}")
    diff = float("nan")
    verify_batch = batch_size + 1
    if verify:
        diff = verify_onnx(model, path, torch.randn(verify_batch, *input_size, device=device))
        if not diff <= atol:
            raise ExportError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} at batch "
                              f"{verify_batch} (allowed {atol:g})")
    return ExportReport(path, batch_size, verify_batch, diff)


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def verify_onnx(model: nn.Module, path: str | Path, x: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime on ``path`` and ``model`` on ``x``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})
    with torch.no_grad():
        expected = _tensors(model.eval()(x))
    if len(outputs) != len(expected):
        raise ExportError(f"{path}: {len(outputs)} ONNX outputs for {len(expected)} PyTorch ones")
    return max((torch.from_numpy(o) - e.cpu()).abs().max().item()
               for o, e in zip(outputs, expected, strict=True))
