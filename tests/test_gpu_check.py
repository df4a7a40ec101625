"""benchmarks/gpu_check.py on the CPU at tiny shapes, so that the GPU check cannot rot."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    return importlib.import_module("gpu_check")


def check_rows(text: str) -> list[list[str]]:
    """The check table's rows (layer, stride, mode, quantity, error, tolerance, verdict, ...)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in text.split("### Times")[0].splitlines() if line.startswith("| ")]
    return rows[1:]


def test_every_layer_passes_every_mode_but_compile_on_cpu(gpu_check, tmp_path, capsys) -> None:
    out = tmp_path / "gpu_check.md"
    assert gpu_check.main(["--device", "cpu", "--no-compile", "--rounds", "1", "--warmup", "0",
                           "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out
    rows = check_rows(text)
    names = gpu_check.layer_names()
    assert "conv" not in names and {"aw", "rfa", "rfcbam", "rfca"} <= set(names)
    checked = {(r[0], r[1], r[2], r[3]) for r in rows}
    assert checked == {(name, stride, mode, quantity) for name in names for stride in "12"
                       for mode in ("fp32", "bf16", "channels-last")
                       for quantity in gpu_check.QUANTITIES}
    assert all(r[6] == "ok" for r in rows)
    times = text.split("### Times")[1]
    assert all(f"| {name} | (2, 8, 8, 8) s1 | eager |" in times for name in names)


def test_a_check_beyond_its_tolerance_fails_the_run(gpu_check, monkeypatch, capsys) -> None:
    monkeypatch.setitem(gpu_check.TOLERANCES, "fp32", dict.fromkeys(gpu_check.QUANTITIES, 0.0))
    assert gpu_check.main(["--device", "cpu", "--layers", "rfa", "--no-compile",
                           "--no-timing"]) == 1
    rows = check_rows(capsys.readouterr().out)
    assert {r[6] for r in rows if r[2] == "fp32"} == {"FAIL"}
    assert {r[6] for r in rows if r[2] != "fp32"} == {"ok"}


@pytest.mark.slow
def test_compiled_layers_match_and_time_on_cpu(gpu_check, capsys) -> None:
    # no time budget: inductor on a shared CPU may take longer than the GPU run's
    assert gpu_check.main(["--device", "cpu", "--layers", "aw", "rfa", "--rounds", "1",
                           "--warmup", "0", "--budget", "1e9"]) == 0
    text = capsys.readouterr().out
    assert {r[6] for r in check_rows(text) if r[2] == "compile"} == {"ok"}
    times = text.split("### Times")[1]
    assert "| rfa | (2, 8, 8, 8) s1 | compiled |" in times and "Error" not in times
