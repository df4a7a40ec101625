"""The fused RFCBAMConv2d / RFCAConv2d (attnconv.ops.rfa_tile on csrc/rfa_fused.cpp) against the
faithful float64 official modules (attnconv.testing.reference_rfa) and their own eager
formulation; the ops' gradients, the modes (autocast, compile, export, double backward)
and the dispatch."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_matches_official, randomise, run

from attnconv import RFCAConv2d, RFCBAMConv2d, ops, use_impl
from attnconv.analysis.profiling import saved_tensor_bytes
from attnconv.ops import _build, rfa, rfa_tile
from attnconv.testing.reference_rfa import OfficialRFCAConv, OfficialRFCBAMConv

pytestmark = pytest.mark.usefixtures("float64_by_default")

LAYERS = {"RFCBAMConv2d": (OfficialRFCBAMConv, RFCBAMConv2d),
          "RFCAConv2d": (OfficialRFCAConv, RFCAConv2d)}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert rfa.fused_available() is None, rfa.fused_available()


def make_pair(name, cin=6, cout=5, k=3, stride=1, seed=0, impl="fused"):
    official, cls = LAYERS[name]
    ref = randomise(official(cin, cout, k, stride), seed)
    layer = cls(cin, cout, k, stride, impl=impl)
    layer.load_official_state_dict(ref.state_dict())
    return ref, layer


# --- 1. equal to the official modules in float64 ------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize(("shape", "k", "stride"), [
    ((2, 6, 7, 9), 3, 1), ((2, 6, 7, 9), 3, 2), ((1, 19, 9, 8), 3, 1), ((3, 17, 11, 7), 3, 2),
    ((2, 5, 9, 10), 5, 1), ((1, 9, 7, 7), 5, 2),
    # rows long enough for the register-blocked runs of 8 (and their 4/2/1 remainders) in the
    # features and, with C a multiple of the vector width, the input gradient
    ((2, 8, 12, 21), 3, 1), ((1, 10, 9, 37), 3, 2),
])
@pytest.mark.parametrize("train", [True, False])
def test_fused_matches_official(name, shape, k, stride, train):
    ref, layer = make_pair(name, shape[1], 5, k, stride)
    ref.train(train)
    layer.train(train)
    assert_matches_official(ref, layer, torch.randn(shape))


@pytest.mark.parametrize("name", LAYERS)
def test_fused_channels_last_input_gives_channels_last_output(name):
    ref, layer = make_pair(name, 8, 4, 3, 2)
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    assert_matches_official(ref, layer, x)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)
    assert layer(x.contiguous()).is_contiguous()


@pytest.mark.parametrize("name", LAYERS)
def test_fused_eval_on_an_empty_batch(name):
    _, layer = make_pair(name)
    assert layer.eval()(torch.randn(0, 6, 7, 9)).shape == (0, 5, 7, 9)


@pytest.mark.parametrize("name", LAYERS)
def test_fused_equals_eager_in_float32_and_several_threads(name):
    _, fused = make_pair(name, 24, 16, 3, 1)
    eager = LAYERS[name][1](24, 16, 3, 1, impl="eager")
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
            for (name_, pf), pe in zip(fused.named_parameters(), eager.parameters(),
                                       strict=True):
                torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-3, atol=1e-3, msg=name_)
    finally:
        torch.set_num_threads(threads)


# --- 2. the ops themselves: gradcheck and gradgradcheck -----------------------------------

def op_inputs(kind, n=2, c=3, h=5, w=6, o=4, k=3, stride=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k2, ho, wo = k * k, (h - 1) // stride + 1, (w - 1) // stride + 1

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).requires_grad_(True)

    f1, f2 = ((rand(n, c), rand(n, ho, wo, k2)) if kind == 0
              else (rand(n, ho, k, c), rand(n, wo, k, c)))
    # the layer's tensors as it holds them: x, weight_dw, gamma, beta, f1, f2, weight, bias
    return (rand(n, c, h, w), rand(c * k2, 1, k, k, scale=0.5), rand(c * k2), rand(c * k2), f1,
            f2, rand(o, c, k, k, scale=0.3), rand(o))


def stats(x, wdw, stride, batch_stats):
    if batch_stats:  # the statistics of this very input, as the layer passes them
        return rfa.rfa_feature_stats(x.detach(), wdw.detach(), stride)
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(9 * x.shape[1], generator=gen),
            torch.rand(9 * x.shape[1], generator=gen) + 0.5)


@pytest.mark.parametrize("kind", [0, 1])
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_ops_gradcheck(kind, batch_stats, stride):
    x, wdw, gamma, beta, f1, f2, weight, bias = op_inputs(kind, stride=stride)

    def reduce(x, wdw, gamma, beta):
        return rfa_tile.rfa_tile_reduce(x, wdw, gamma, beta, *stats(x, wdw, stride, batch_stats),
                                        stride, kind, batch_stats, 1e-5)[:2]

    def attend(x, wdw, gamma, beta, f1, f2, weight, bias):
        return rfa_tile.rfa_tile_attend(x, wdw, gamma, beta, *stats(x, wdw, stride, batch_stats),
                                        f1, f2, weight, bias, None, stride, kind, batch_stats,
                                        1e-5)

    def both(x, wdw, gamma, beta, f1, f2, weight, bias):
        """The pair as the layers run it: the attend op's share of the BN and depthwise
        backward handed to the reduce op's through the handle."""
        common = (x, wdw, gamma, beta, *stats(x, wdw, stride, batch_stats))
        r1, r2, handle = rfa_tile.rfa_tile_reduce(*common, stride, kind, batch_stats, 1e-5)
        # factors that depend on the reductions, as the layers' do
        f1 = f1 * (1 + r1.mean()) if kind == 0 else f1 * (1 + r1)
        out = rfa_tile.rfa_tile_attend(*common, f1, f2, weight, bias, handle, stride, kind,
                                       batch_stats, 1e-5)
        return out, r2

    assert torch.autograd.gradcheck(reduce, (x, wdw, gamma, beta))
    assert torch.autograd.gradcheck(attend, (x, wdw, gamma, beta, f1, f2, weight, bias))
    assert torch.autograd.gradcheck(both, (x, wdw, gamma, beta, f1, f2, weight, bias))


@pytest.mark.slow  # 15-25 s on 2 shared cores: numerical second derivatives of two ops
@pytest.mark.parametrize("kind", [0, 1])
def test_second_derivative_goes_through_the_eager_formulation(kind):
    x, wdw, gamma, beta, f1, f2, weight, bias = op_inputs(kind, n=1, c=2, h=3, w=4, o=2)
    mean, var = stats(x, wdw, 1, False)

    def ops(x, f1, f2):
        r1, r2, handle = rfa_tile.rfa_tile_reduce(x, wdw, gamma, beta, mean, var, 1, kind, False,
                                                  1e-5)
        out = rfa_tile.rfa_tile_attend(x, wdw, gamma, beta, mean, var, f1, f2, weight, bias,
                                       handle, 1, kind, False, 1e-5)
        return out, r1, r2

    assert torch.autograd.gradgradcheck(ops, (x, f1, f2))


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_layer_double_backward_equals_official(name, train):
    """The gradient-penalty pattern (WGAN-GP style): grad of a penalty on the input gradient."""
    ref, layer = make_pair(name, 4, 3)
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

@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32_and_answers_in_the_autocast_dtype(name, dtype):
    _, layer = make_pair(name, 8, 8)
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


@pytest.mark.parametrize("name", LAYERS)
def test_bfloat16_layer_matches_float32_within_tolerance(name):
    _, layer = make_pair(name, 8, 8)
    layer = layer.float().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float32)
    expected = layer(x)
    out = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", LAYERS)
def test_torch_compile_calls_the_fused_ops(name):
    _, layer = make_pair(name)
    x = torch.randn(2, 6, 7, 7)
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return gm

    layer.eval()
    out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, layer(x))
    assert "attnconv.rfa_tile_reduce" in graphs[0]
    assert "attnconv.rfa_tile_attend" in graphs[0]


@pytest.mark.parametrize("name", LAYERS)
def test_export_uses_the_decomposed_formulation(name):
    _, layer = make_pair(name)
    x = torch.randn(2, 6, 7, 7)
    program = torch.export.export(layer.eval(), (x,))
    assert "attnconv" not in str(program.graph)
    torch.testing.assert_close(program.module()(x), layer(x))


# --- 4. memory, dispatch and fallback -----------------------------------------------------

@pytest.mark.parametrize("name", LAYERS)
def test_fused_keeps_no_k2_sized_tensor_for_backward(name):
    """x, the small factors' graph (RFCBAM's pooled maps are 2 k2 / C of x), the parameters
    and statistics; eager keeps several k2-sized tensors."""
    x = torch.randn(2, 32, 32, 32, dtype=torch.float32)
    cls = LAYERS[name][1]
    fused = cls(32, 32, impl="fused", dtype=torch.float32)
    eager = cls(32, 32, impl="eager", dtype=torch.float32)
    assert saved_tensor_bytes(fused, x) <= 2.5 * x.numel() * x.element_size()
    assert saved_tensor_bytes(eager, x) > 8 * x.numel() * x.element_size()


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_training_runs_one_bn_and_depthwise_backward_for_both_ops(name, train, monkeypatch):
    """The attend op hands its share of dL/du to the reduce op's backward (through the
    handle), which runs the BN + depthwise backward once for both; the gradients stay those
    of the official module (the float64 tests above)."""
    seen = {"defer": [], "du": []}
    attend_backward, reduce_backward = (rfa_tile.rfa_tile_attend_backward,
                                        rfa_tile.rfa_tile_reduce_backward)

    def attend(*args):
        seen["defer"].append(args[14])
        return attend_backward(*args)

    def reduce(*args):
        seen["du"].append(None if args[2] is None else tuple(args[2].shape))
        return reduce_backward(*args)

    monkeypatch.setattr(rfa_tile, "rfa_tile_attend_backward", attend)
    monkeypatch.setattr(rfa_tile, "rfa_tile_reduce_backward", reduce)
    layer = LAYERS[name][1](6, 5, impl="fused").train(train)
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    layer(x).sum().backward()
    assert seen == {"defer": [True], "du": [(2, 7, 7, 54)]}
    assert x.grad is not None and layer.feature_conv.weight.grad is not None


@pytest.mark.parametrize("name", LAYERS)
def test_impl_reaches_the_dispatch(name, monkeypatch):
    calls = []
    real = rfa_tile.rfa_tile_attend

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(ops, "rfa_tile_attend", counting)
    cls = LAYERS[name][1]
    x = torch.randn(2, 6, 7, 7)
    assert cls(6, 5, impl="eager").impl == "eager"
    cls(6, 5, impl="eager")(x)
    assert calls == []
    cls(6, 5, impl="fused")(x)
    assert calls == [1]
    auto = cls(6, 5)
    for training in (False, True):  # auto on CPU: the layer's measured choice for the mode
        before = len(calls)
        auto.train(training)(x)
        assert len(calls) - before == int(cls._auto_fused[training])
    calls.clear()
    layer = cls(6, 5, impl="fused")
    with use_impl(layer, "eager"):
        layer(x)
    assert calls == [] and layer.impl == "fused"
    layer(x)
    assert calls == [1]


@pytest.mark.parametrize("name", LAYERS)
def test_bad_impl_is_rejected(name):
    with pytest.raises(ValueError, match=f"{name}: impl must be one of"):
        LAYERS[name][1](6, 5, impl="compiled")


@pytest.mark.parametrize("name", LAYERS)
def test_without_the_kernel_the_layer_runs_eager_and_warns_once(name, monkeypatch):
    monkeypatch.setitem(_build._loaded, "rfa_fused", "no compiler (test)")
    monkeypatch.setattr(rfa, "_warned", set())
    ref, layer = make_pair(name)
    x = torch.randn(2, 6, 7, 9)
    with pytest.warns(RuntimeWarning, match=rf"{name}: running the eager path.*no compiler"):
        assert_matches_official(ref, layer, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # the second time in silence
