"""The fused RFAConv kernel (attnconv.ops.rfa, csrc/rfa_fused.cpp) against the faithful float64
official module (attnconv.testing.reference_rfa) and against its own eager formulation; the
dispatch (impl=, set_impl, use_impl) and the fallback with its warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_matches_official, randomise, run

from attnconv import AWConv2d, RFAConv2d, ops, set_impl, use_impl
from attnconv.analysis.profiling import saved_tensor_bytes
from attnconv.ops import _build, rfa
from attnconv.testing.reference_rfa import OfficialRFAConv

pytestmark = pytest.mark.usefixtures("float64_by_default")


@pytest.fixture(scope="module", autouse=True)
def built():
    """The kernel must build here (CI has gcc and the pinned ninja)."""
    assert rfa.fused_available() is None, rfa.fused_available()


def make_pair(cin=6, cout=5, k=3, stride=1, seed=0, impl="fused"):
    ref = randomise(OfficialRFAConv(cin, cout, k, stride), seed)
    layer = RFAConv2d(cin, cout, k, stride, impl=impl)
    layer.load_official_state_dict(ref.state_dict())
    return ref, layer


# --- 1. equal to the official module in float64 -------------------------------------------

# channels 19 and 17: a block of four float64 vectors (16 lanes) and a tail
@pytest.mark.parametrize(("shape", "k", "stride"), [
    ((2, 6, 7, 9), 3, 1), ((2, 6, 7, 9), 3, 2), ((1, 19, 9, 8), 3, 1), ((3, 17, 11, 7), 3, 2),
    ((2, 5, 9, 10), 5, 1), ((1, 9, 7, 7), 5, 2),
    # rows long enough for the register-blocked runs of 8 (and their 4/2/1 remainders) in the
    # features and, with C a multiple of the vector width, the input gradient
    ((2, 8, 12, 21), 3, 1), ((1, 10, 9, 37), 3, 2),
])
@pytest.mark.parametrize("train", [True, False])
def test_fused_matches_official(shape, k, stride, train):
    ref, layer = make_pair(shape[1], 5, k, stride)
    ref.train(train)
    layer.train(train)
    assert_matches_official(ref, layer, torch.randn(shape))


def test_fused_channels_last_input_gives_channels_last_output():
    ref, layer = make_pair(8, 4, 3, 2)
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    assert_matches_official(ref, layer, x)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)
    assert layer(x.contiguous()).is_contiguous()


def test_fused_eval_on_an_empty_batch():
    _, layer = make_pair()
    out = layer.eval()(torch.randn(0, 6, 7, 9))
    assert out.shape == (0, 5, 7, 9)


def test_fused_equals_eager_in_float32_and_several_threads():
    _, fused = make_pair(24, 16, 3, 1)
    eager = RFAConv2d(24, 16, 3, 1, impl="eager")
    eager.load_state_dict(fused.state_dict())
    fused, eager = fused.float(), eager.float()
    x = torch.randn(3, 24, 13, 12, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out_f, grad_f = run(fused, x)
            out_e, grad_e = run(eager, x)
            torch.testing.assert_close(out_f, out_e, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(grad_f, grad_e, rtol=1e-4, atol=1e-4)
            for (name, pf), pe in zip(fused.named_parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-3, atol=1e-3, msg=name)
    finally:
        torch.set_num_threads(threads)


# --- 2. the op itself: gradcheck and gradgradcheck ----------------------------------------

def op_inputs(n=2, c=3, h=5, w=6, o=4, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k2 = k * k

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).requires_grad_(True)

    # the layer's tensors as it holds them: x, weight_dw, gamma, beta, logit_scale, weight, bias
    return (rand(n, c, h, w), rand(c * k2, 1, k, k, scale=0.5), rand(c * k2), rand(c * k2),
            rand(c, k2), rand(o, c, k, k, scale=0.3), rand(o))


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_op_gradcheck(batch_stats, stride):
    x, wdw, gamma, beta, a, weight, bias = op_inputs()
    running = torch.randn(27), torch.rand(27) + 0.5

    def op(x, wdw, gamma, beta, a, weight, bias):
        if batch_stats:  # the statistics of this very input, as the layer passes them
            mean, var = rfa.rfa_feature_stats(x.detach(), wdw.detach(), stride)
        else:
            mean, var = running
        return rfa.rfa_fused(x, wdw, gamma, beta, mean, var, a, weight, bias, stride,
                             batch_stats, 1e-5)

    assert torch.autograd.gradcheck(op, (x, wdw, gamma, beta, a, weight, bias))


def test_second_derivative_goes_through_the_eager_formulation():
    x, wdw, gamma, beta, a, weight, bias = op_inputs(n=1, c=2, h=3, w=4, o=2)
    running = torch.randn(18), torch.rand(18) + 0.5

    def op(x, a):
        return rfa.rfa_fused(x, wdw, gamma, beta, *running, a, weight, bias, 1, False, 1e-5)

    assert torch.autograd.gradgradcheck(op, (x, a))


@pytest.mark.parametrize("train", [True, False])
def test_layer_double_backward_equals_official(train):
    """The gradient-penalty pattern (WGAN-GP style): grad of a penalty on the input gradient."""
    ref, layer = make_pair(4, 3)
    x = torch.randn(2, 4, 6, 5)
    for module in (ref, layer):
        module.train(train)
        xi = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(module(xi).square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for key, (tensor, _) in layer.official_keys().items():
        if key in ref_params:
            torch.testing.assert_close(tensor.grad.reshape(ref_params[key].shape),
                                       ref_params[key].grad, msg=key)


# --- 3. precision, compile, export --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32_and_answers_in_the_autocast_dtype(dtype):
    _, layer = make_pair(8, 8)
    layer = layer.float()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x.requires_grad_(True))
    assert out.dtype == dtype
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    assert layer.feature_bn.running_mean.dtype == torch.float32
    expected = layer.eval()(x.detach())
    with torch.autocast("cpu", dtype=dtype):
        out = layer.eval()(x.detach())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_bfloat16_layer_matches_float32_within_tolerance():
    _, layer = make_pair(8, 8)
    layer = layer.float().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float32)
    expected = layer(x)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


def test_torch_compile_calls_the_fused_op_as_one_node():
    _, layer = make_pair()
    x = torch.randn(2, 6, 7, 7)
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return gm

    layer.eval()
    out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, layer(x))
    assert "attnconv.rfa_fused" in graphs[0]


def test_export_uses_the_decomposed_formulation():
    _, layer = make_pair()
    x = torch.randn(2, 6, 7, 7)
    program = torch.export.export(layer.eval(), (x,))
    assert "attnconv" not in str(program.graph)
    torch.testing.assert_close(program.module()(x), layer(x))


# --- 4. memory, dispatch and fallback -----------------------------------------------------

def test_fused_keeps_about_the_input_for_backward():
    x = torch.randn(2, 8, 16, 16, dtype=torch.float32)
    fused = RFAConv2d(8, 8, impl="fused", dtype=torch.float32)
    eager = RFAConv2d(8, 8, impl="eager", dtype=torch.float32)
    assert saved_tensor_bytes(fused, x) <= 1.5 * x.numel() * x.element_size()
    assert saved_tensor_bytes(eager, x) > 8 * x.numel() * x.element_size()


def test_impl_reaches_the_dispatch(monkeypatch):
    calls = []
    real = rfa.rfa_fused

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "rfa_fused", counting)
    x = torch.randn(2, 6, 7, 7)
    assert RFAConv2d(6, 5, impl="eager").impl == "eager"
    RFAConv2d(6, 5, impl="eager")(x)
    assert calls == []
    RFAConv2d(6, 5, impl="fused")(x)
    assert calls == [1]
    RFAConv2d(6, 5)(x)  # auto on CPU: fused
    assert calls == [1, 1]
    model = torch.nn.Sequential(RFAConv2d(6, 5, impl="fused"), AWConv2d(5, 5, 3, padding=1))
    with use_impl(model, "eager"):  # the RFA layer only: AW has no path of that name
        assert [m.impl for m in model] == ["eager", "auto"]
        model(x)
    assert calls == [1, 1]
    assert [m.impl for m in model] == ["fused", "auto"]  # the layers' own choices are back
    assert set_impl(model, "eager") == 1 and model[0].impl == "eager"
    model(x)
    assert calls == [1, 1]


@pytest.mark.parametrize("impl", ["compiled", "FUSED", 1, None])
def test_bad_impl_is_rejected(impl):
    with pytest.raises(ValueError, match="RFAConv2d: impl must be one of"):
        RFAConv2d(6, 5, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        set_impl(torch.nn.Sequential(RFAConv2d(6, 5)), impl)


def test_without_the_kernel_the_layer_runs_eager_and_warns_once(monkeypatch):
    monkeypatch.setitem(_build._loaded, "rfa_fused", "no compiler (test)")
    monkeypatch.setattr(rfa, "_warned", set())
    ref, layer = make_pair()
    x = torch.randn(2, 6, 7, 9)
    with pytest.warns(RuntimeWarning, match=r"RFAConv2d: running the eager path.*no compiler"):
        assert_matches_official(ref, layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # the second time in silence


def test_an_uncovered_device_runs_eager_and_says_why(monkeypatch):
    monkeypatch.setattr(rfa, "_warned", set())
    with pytest.warns(RuntimeWarning, match="CPU tensors only, got a meta tensor"):
        assert not rfa.use_fused("RFAConv2d", "fused", torch.empty(1, 2, 3, 3, device="meta"))


def test_a_failed_build_is_reported_with_its_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "CSRC", tmp_path)
    assert "is missing" in _build._load("rfa_fused")
    monkeypatch.setenv("ATTNCONV_NO_EXTENSIONS", "1")
    assert _build._load("rfa_fused") == "ATTNCONV_NO_EXTENSIONS is set"
