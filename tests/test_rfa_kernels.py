"""The C++ operators of the RFA family as operators: opcheck on every one, 1 and 2 threads,
inputs of every scale and dtype, and how the library is built and loaded (OpenMP, its build
folder, the build lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from attnconv import RFAConv2d, RFCAConv2d, RFCBAMConv2d
from attnconv.layers import CONV_LAYERS, create_conv
from attnconv.ops import _build, rfa

RFA_LAYERS = {"rfa": RFAConv2d, "rfcbam": RFCBAMConv2d, "rfca": RFCAConv2d}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert rfa.fused_available() is None, rfa.fused_available()


def _operands(n=2, c=5, o=4, h=7, w=6, k=3, dtype=torch.float64, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k2 = k * k

    def rand(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=gen, dtype=dtype) * scale + shift
        return t.requires_grad_(grad)

    x = rand(n, c, h, w)
    # the layer's tensors as it holds them
    return {
        "x": x, "weight_dw": rand(c * k2, 1, k, k, scale=0.4),
        "gamma": rand(c * k2, scale=0.3, shift=1.0), "beta": rand(c * k2, scale=0.3),
        "mean": torch.randn(c * k2, generator=gen, dtype=dtype),
        "var": torch.rand(c * k2, generator=gen, dtype=dtype) + 0.5, "a": rand(c, k2),
        "weight": rand(o, c, k, k, scale=0.3), "bias": rand(o, scale=0.1),
    }


def _factors(kind, n, c, ho, wo, k, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    if kind == 0:
        return (torch.rand(n, c, generator=gen, dtype=dtype).requires_grad_(),
                torch.rand(n, ho, wo, k * k, generator=gen, dtype=dtype).requires_grad_())
    return (torch.rand(n, ho, k, c, generator=gen, dtype=dtype).requires_grad_(),
            torch.rand(n, wo, k, c, generator=gen, dtype=dtype).requires_grad_())


# --- torch.library.opcheck on every operator -------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_opcheck_rfa_fused(stride, batch_stats):
    t = _operands()
    args = (t["x"], t["weight_dw"], t["gamma"], t["beta"], t["mean"], t["var"], t["a"],
            t["weight"], t["bias"], stride, batch_stats, 1e-5)
    torch.library.opcheck(torch.ops.attnconv.rfa_fused.default, args)
    out = torch.ops.attnconv.rfa_fused(*args)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.attnconv.rfa_fused_backward.default, (
        grad, *(v.detach() for v in args[:8]), True, stride, batch_stats, 1e-5))


def test_opcheck_rfa_feature_stats():
    t = _operands(grad=False)
    torch.library.opcheck(torch.ops.attnconv.rfa_feature_stats.default,
                          (t["x"], t["weight_dw"], 2))


@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("stride", [1, 2])
def test_opcheck_tile_ops(kind, stride):
    t = _operands()
    n, c, h, w = t["x"].shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    f1, f2 = _factors(kind, n, c, ho, wo, 3)
    common = (t["x"], t["weight_dw"], t["gamma"], t["beta"], t["mean"], t["var"])
    torch.library.opcheck(torch.ops.attnconv.rfa_tile_reduce.default,
                          (*common, stride, kind, True, 1e-5))
    detached = tuple(v.detach() for v in common)
    _, _, handle = torch.ops.attnconv.rfa_tile_reduce(*detached, stride, kind, True, 1e-5)
    for h in (None, handle.detach().requires_grad_()):
        attend = (*common, f1, f2, t["weight"], t["bias"], h, stride, kind, True, 1e-5)
        torch.library.opcheck(torch.ops.attnconv.rfa_tile_attend.default, attend)
    r1, r2, _ = torch.ops.attnconv.rfa_tile_reduce(*detached, stride, kind, True, 1e-5)
    weight = t["weight"].detach()
    out = torch.ops.attnconv.rfa_tile_attend(*detached, f1.detach(), f2.detach(), weight, None,
                                             None, stride, kind, True, 1e-5)
    for defer in (False, True):
        grads = torch.ops.attnconv.rfa_tile_attend_backward(
            torch.randn_like(out), *detached, f1.detach(), f2.detach(), weight, False, stride,
            kind, True, defer, 1e-5)
        torch.library.opcheck(torch.ops.attnconv.rfa_tile_attend_backward.default, (
            torch.randn_like(out), *detached, f1.detach(), f2.detach(), weight, False, stride,
            kind, True, defer, 1e-5))
        du = grads[-1] if defer else None
        torch.library.opcheck(torch.ops.attnconv.rfa_tile_reduce_backward.default, (
            torch.randn_like(r1), torch.randn_like(r2), du, *detached, stride, kind, True, 1e-5))


# --- 1 and 2 threads ------------------------------------------------------------------------

def _step(layer, x):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return [out.detach(), x.grad, *(p.grad.clone() for p in layer.parameters())]


@pytest.mark.parametrize("name", RFA_LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_one_and_two_threads_give_the_same_results(name, train):
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            torch.manual_seed(0)
            layer = RFA_LAYERS[name](8, 6, 3, 1, impl="fused").double().train(train)
            x = torch.randn(3, 8, 13, 11, dtype=torch.float64)
            results.append(_step(layer, x))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)


def test_the_library_is_built_with_torchs_openmp():
    """Built without OpenMP, at::parallel_for is a serial loop and the kernels use one core."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch is not built with OpenMP")
    assert "-fopenmp" in _build.openmp_flags()[0]
    library = _build._library_file(_build.build_dir("rfa_fused"), _build.library_name("rfa_fused"))
    assert library is not None
    assert b"GOMP_parallel" in library.read_bytes()


# --- inputs of every scale and dtype -----------------------------------------------------------

@pytest.mark.parametrize("name", RFA_LAYERS)
@pytest.mark.parametrize("scale", [1e10, 1e15, 1e18])
@pytest.mark.parametrize("train", [True, False])
def test_large_inputs_stay_finite_where_the_eager_path_does(name, scale, train):
    torch.manual_seed(0)
    fused = RFA_LAYERS[name](6, 5, 3, impl="fused").train(train)
    eager = RFA_LAYERS[name](6, 5, 3, impl="eager").train(train)
    eager.load_state_dict(fused.state_dict())
    exact = RFA_LAYERS[name](6, 5, 3, impl="eager").double().train(train)
    exact.load_state_dict(fused.state_dict())
    x = torch.randn(2, 6, 9, 8) * scale
    with torch.no_grad():
        want = eager(x)
        got = fused(x)
        reference = exact(x.double()).float()
    if not torch.isfinite(want).all():
        pytest.skip("the eager path itself is not finite here")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())


@pytest.mark.parametrize("name", [n for n in CONV_LAYERS if n != "conv"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool])
def test_integer_and_bool_inputs_are_refused_as_conv2d_refuses_them(name, dtype):
    layer = create_conv(name, 4, 6, 3, padding=1).eval()
    x = torch.randint(0, 5, (2, 4, 9, 9)).to(dtype)
    with pytest.raises(TypeError, match="expected a floating-point input"):
        layer(x)
    with pytest.raises(RuntimeError):
        F.conv2d(x, torch.randn(6, 4, 3, 3))


# --- building and loading ----------------------------------------------------------------------

def test_the_build_folder_belongs_to_the_installation(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNCONV_BUILD_DIR", raising=False)
    root = _build.build_root()
    package = os.path.dirname(os.path.dirname(_build.__file__))
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    assert str(root).startswith(package) or ".cache/attnconv/" in str(root)
    assert not str(root).startswith(home_cache)
    monkeypatch.setenv("ATTNCONV_BUILD_DIR", str(tmp_path))
    assert _build.build_dir("rfa_fused").parent == tmp_path


_HOLD = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def _holder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder / "build.lock")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_build_held_by_another_process_is_waited_for_with_a_message_and_a_limit(
        tmp_path, capsys):
    proc = _holder(tmp_path)
    try:
        start = time.monotonic()
        with _build.build_lock(tmp_path, limit=0.6, poll=0.1) as held:
            assert held is False
        assert 0.5 < time.monotonic() - start < 10
        assert "waiting up to 1 s for another process building" in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_builders_lock_is_stale(tmp_path):
    proc = _holder(tmp_path)
    proc.kill()
    proc.wait()
    (tmp_path / "lock").write_text("")  # what an older torch leaves behind a killed build
    with _build.build_lock(tmp_path, limit=0.0) as held:
        assert held is True
        assert not (tmp_path / "lock").exists()


def test_a_first_use_past_the_limit_runs_eager_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCONV_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNCONV_BUILD_WAIT", "0.2")
    proc = _holder(_build.build_dir("rfa_fused"))
    try:
        reason = _build._load("rfa_fused")
    finally:
        proc.kill()
        proc.wait()
    assert "held the build lock" in reason and "ATTNCONV_BUILD_WAIT" in reason


@pytest.mark.parametrize("name", RFA_LAYERS)
def test_auto_is_the_eager_path_off_cpu_without_a_warning(name, recwarn):
    layer = RFA_LAYERS[name](4, 4)
    assert not rfa.use_fused(name, layer.impl, torch.empty(1, 4, 3, 3, device="meta"))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
