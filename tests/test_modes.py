"""The contract every layer of ``create_conv`` and one zoo model per family keep under every
way people run them: {fp32, bf16 autocast, fp16 autocast} x {train, eval} x
{contiguous, channels-last} x {batch 0, 1, 3}, compiled, exported, and first and second
derivatives in float64.

Tolerances (largest |low precision - fp32| over the largest |fp32| output, on these tiny
random layers; benchmarks/RESULTS.md has the measured values): bf16 3e-2, fp16 4e-3.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise
from torch import nn
from torch.func import functional_call

from attnconv import (
    CONV_LAYERS,
    ECA,
    AWConv2d,
    RFAConv2d,
    RFCAConv2d,
    RFCBAMConv2d,
    create_attn,
    create_conv,
    create_model,
)
from attnconv.export import export_program
from attnconv.layers.aw_conv import IMPLS as AW_IMPLS
from attnconv.models import MODEL_ARGS
from attnconv.testing.reference_rfa import OfficialRFAConv, OfficialRFCAConv, OfficialRFCBAMConv

#: every create_conv name, AW with each of its paths
LAYERS = [layer for name in CONV_LAYERS
          for layer in ([f"aw-{impl}" for impl in AW_IMPLS if impl != "auto"] if name == "aw"
                        else [name])]


def one_model_per_part() -> list[str]:
    """Zoo models that together hold every conv layer, activation attention and block type the
    zoo uses: at each step the model adding the most parts not yet held (the smaller first)."""
    def parts(name: str) -> set[tuple[str, str]]:
        args = MODEL_ARGS[name]
        held = {("block", args["block"].__name__), ("conv", args.get("conv_layer", "conv"))}
        return held | ({("attn", args["attn_layer"])} if args.get("attn_layer") else set())

    candidates = sorted(MODEL_ARGS, key=lambda name: (sum(MODEL_ARGS[name]["layers"]), name))
    held: set[tuple[str, str]] = set()
    chosen = []
    while missing := set().union(*map(parts, candidates)) - held:
        best = max(candidates, key=lambda name: len(parts(name) & missing))  # first of equals
        chosen.append(best)
        held |= parts(best)
    return chosen


#: zoo models holding every conv layer, activation attention and block type of the zoo
MODELS = one_model_per_part()
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: largest error over the largest |fp32 value|, outputs and gradients
TOLERANCE = {"fp32": 1e-6, "bf16": 3e-2, "fp16": 4e-3}
CIN, COUT = 4, 6


def make_layer(name: str, dtype: torch.dtype = torch.float32, cin: int = CIN,
               cout: int = COUT, seed: int = 0) -> nn.Module:
    kwargs = {}
    if name.startswith("aw-"):
        name, kwargs["impl"] = "aw", name[3:]
    layer = create_conv(name, cin, cout, 3, stride=1, padding=1, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random attention too (AW's Pointconv2 starts at zero)
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return layer


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    # Width 16: at width 4 or 8, plain timm ResNet-18s in channels-last crash in oneDNN's
    # backward on this CPU (torch 2.14.1; a segmentation fault, not an error).
    model = create_model(name, num_classes=5, cifar_stem=True, channels=(16, 16, 16, 16))
    with torch.no_grad():  # AW's attention and zero-initialised last BNs: make them count
        for module in model.modules():
            if isinstance(module, AWConv2d):
                nn.init.normal_(module.pointconv2.weight, std=0.03)
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def run(module: nn.Module, x: torch.Tensor, precision: str):
    """Output, input gradient and parameter gradients of a fixed loss, under autocast."""
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    dtype = PRECISIONS[precision]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = module(x)
    weights = torch.linspace(-1, 1, out.shape[1:].numel()).view(out.shape[1:])
    (out.float() * weights).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out, x.grad, grads


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str,
                          floor: float = 1e-6):
    """Largest error within ``tol`` x the largest |expected| (at least ``floor``)."""
    assert actual.shape == expected.shape, what
    if not expected.numel():
        return
    scale = max(expected.abs().max().item(), floor)
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= tol * scale, f"{what}: error {error:.3g} vs scale {scale:.3g}"


def check_cell(module: nn.Module, x: torch.Tensor, precision: str, train: bool,
               depth: int = 1) -> None:
    """One cell of the matrix: the same module state run in fp32 and in ``precision``.

    ``depth`` > 1 (a network) widens the output bound that many times and checks only that the
    gradients are finite: through a deep stack, BatchNorm over a handful of values (batch 1,
    2 x 2 maps) amplifies rounding beyond any fixed bound, in plain torch layers too."""
    module.train(train)
    reference = copy.deepcopy(module)
    out, grad_x, grads = run(module, x, precision)
    ref_out, ref_grad_x, _ = run(reference, x, "fp32")
    expected_dtype = PRECISIONS[precision] or torch.float32
    assert out.dtype == expected_dtype
    assert out.shape == ref_out.shape
    tol = TOLERANCE[precision]
    assert_close_relative(out, ref_out, depth * tol, "output")
    assert grad_x.dtype == x.dtype and torch.isfinite(grad_x).all()
    for name, grad in grads.items():
        # every parameter gets a finite fp32 gradient (an empty batch: none, or zeros)
        if not x.shape[0]:
            assert grad is None or not grad.any(), name
            continue
        assert grad is not None, name
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    if x.shape[0] and depth == 1:
        assert_close_relative(grad_x, ref_grad_x, 4 * tol, "input gradient")
    for (name, buffer), (_, ref_buffer) in zip(module.named_buffers(), reference.named_buffers(),
                                               strict=True):
        assert buffer.dtype == ref_buffer.dtype, name  # running statistics stay fp32
        if buffer.is_floating_point():
            # running means near zero: relative to the data's scale (about 1), not to theirs
            assert_close_relative(buffer, ref_buffer, 4 * depth * tol, name, floor=0.1)


def input_for(batch: int, layout: str, channels: int = CIN, size: int = 6) -> torch.Tensor:
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


# --- 1. the eager matrix ---------------------------------------------------------------------

@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", LAYERS)
def test_layer_matrix(name, precision, train, layout, batch):
    layer = make_layer(name)
    if layout == "channels_last":
        layer = layer.to(memory_format=torch.channels_last)
    check_cell(layer, input_for(batch, layout), precision, train)


def _model_cells():
    """The model matrix. Per model, the six (precision, mode) cells each take one of the six
    (layout, batch) pairs, so `make test` covers every value of every axis on every model; the
    other cells of the full cross product are marked slow (`make test-slow`, also run by CI)."""
    layouts, batches = ("contiguous", "channels_last"), (0, 1, 3)
    for name in MODELS:
        for i, (precision, train) in enumerate(itertools.product(PRECISIONS, (True, False))):
            for layout, batch in itertools.product(layouts, batches):
                fast = (layout, batch) == (layouts[i % 2], batches[i % 3])
                yield pytest.param(
                    name, precision, train, layout, batch, marks=() if fast else pytest.mark.slow,
                    id=f"{name}-{precision}-{'train' if train else 'eval'}-{layout}-{batch}")


@pytest.mark.parametrize(("name", "precision", "train", "layout", "batch"), list(_model_cells()))
def test_model_matrix(name, precision, train, layout, batch):
    model = make_model(name)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    # In training at batch 1 the last stage's BatchNorm normalises 2 x 2 values per channel,
    # which amplifies half-precision rounding far beyond any layer bound (plain timm ResNets
    # too): those cells check dtypes and finiteness, and the output within 40x.
    depth = 40 if train and batch == 1 else 10
    check_cell(model, input_for(batch, layout, channels=3, size=16), precision, train,
               depth=depth)


def test_aw_auto_picks_the_chunked_path_under_autocast_too():
    layer = AWConv2d(256, 256, 3, padding=1)
    x = torch.randn(4, 256, 4, 4)
    assert layer.resolved_impl(x) == "chunked"  # 9.4 MB of kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert_close_relative(out, layer(x), TOLERANCE["bf16"], "output")


@pytest.mark.parametrize("name", ["resnet18_rfa", "resnet50_cbam_aw"])
def test_grad_scaler_with_fp16_trains(name):
    model = make_model(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, target = input_for(4, "contiguous", 3, 16), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no step was skipped for inf/nan gradients
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


# --- 2. derivatives in float64: gradcheck and gradgradcheck --------------------------------

def functional(module: nn.Module):
    names = [name for name, _ in module.named_parameters()]

    def fn(x, *values):
        return functional_call(module, dict(zip(names, values, strict=True)), (x,))

    return fn


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYERS)
def test_gradcheck_and_gradgradcheck_in_float64(name, train):
    layer = make_layer(name, torch.float64, cin=2, cout=2).train(train)
    if not train:  # random running statistics, so the folded BN is not the identity
        randomise(layer)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    inputs = (x, *[p.detach().requires_grad_(True) for p in layer.parameters()])
    fn = functional(layer)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def gradient_penalty_grads(module: nn.Module, x: torch.Tensor, params: list[torch.Tensor]):
    """WGAN-GP: the gradients of a penalty on the input gradient (create_graph=True)."""
    x = x.detach().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
    penalty = (grad_x.flatten(1).norm(dim=1) - 1).square().mean()
    return torch.autograd.grad(penalty, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("cls", "official"), [(RFAConv2d, OfficialRFAConv),
                                               (RFCBAMConv2d, OfficialRFCBAMConv),
                                               (RFCAConv2d, OfficialRFCAConv)])
def test_gradient_penalty_matches_the_official_module(cls, official, train):
    ref = randomise(official(6, 5, 3, 1).double()).train(train)
    layer = cls(6, 5, 3, 1, dtype=torch.float64).train(train)
    layer.load_official_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    ref_params = dict(ref.named_parameters())
    params = dict(layer.named_parameters())
    expected = gradient_penalty_grads(ref, x, list(ref_params.values()))
    actual = gradient_penalty_grads(layer, x, list(params.values()))
    assert max(g.abs().max() for g in expected) > 0.1
    # The official gradients in this layer's layout: loaded as if they were the parameters.
    laid_out = copy.deepcopy(layer)
    laid_out.load_official_state_dict(ref.state_dict() | dict(zip(ref_params, expected,
                                                                 strict=True)))
    for (name, want), got in zip(laid_out.named_parameters(), actual, strict=True):
        torch.testing.assert_close(got, want, msg=name)


def test_gradient_penalty_of_the_chunked_aw_path_matches_the_grouped_one():
    layer = make_layer("aw-grouped", torch.float64)
    x = torch.randn(3, CIN, 6, 6, dtype=torch.float64)
    params = list(layer.parameters())
    expected = gradient_penalty_grads(layer, x, params)
    assert sum(bool(g.any()) for g in expected) >= 4  # all but the biases (zero: linear in them)
    for chunk_size in (1, 2, None):
        layer.impl, layer.chunk_size = "chunked", chunk_size
        for got, want in zip(gradient_penalty_grads(layer, x, params), expected, strict=True):
            torch.testing.assert_close(got, want)


# --- 3. torch.compile and torch.export -------------------------------------------------------

def compiled_matches_eager(module: nn.Module, x: torch.Tensor, precision: str, backend: str,
                           train: bool = True) -> None:
    module.train(train)
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    got_out, got_grad, got_grads = run(compiled, x, precision)
    out, grad, grads = run(eager, x, precision)
    tol = max(TOLERANCE[precision], 1e-4)  # compiled graphs round in another order
    assert_close_relative(got_out, out, tol, "output")
    assert_close_relative(got_grad, grad, 4 * tol, "input gradient")
    for name, g in grads.items():  # the compiled module names them "_orig_mod.<name>"
        assert_close_relative(got_grads[f"_orig_mod.{name}"], g, 4 * tol, name)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_compiles_fullgraph_and_matches_eager(name):
    torch._dynamo.reset()
    compiled_matches_eager(make_layer(name), input_for(3, "contiguous"), "bf16", "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["aw-chunked", "rfa", "rfcbam"])
def test_layer_compiles_with_inductor(name):
    torch._dynamo.reset()
    compiled_matches_eager(make_layer(name), input_for(3, "contiguous"), "fp32", "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_model_compiles_fullgraph_and_matches_eager(name):
    torch._dynamo.reset()
    compiled_matches_eager(make_model(name), input_for(3, "contiguous", 3, 16), "fp32",
                           "aot_eager")


@pytest.mark.parametrize("name", LAYERS)
def test_layer_exports_with_a_dynamic_batch(name):
    layer = make_layer(name).eval()
    randomise(layer)
    program = export_program(layer, input_for(2, "contiguous"))
    x = input_for(3, "contiguous")
    torch.testing.assert_close(program.module()(x), layer(x))


# --- 4. layer details: running statistics, empty batches, argument checks ----------------------

@pytest.mark.parametrize("cls", [RFCBAMConv2d, RFCAConv2d, RFAConv2d])
def test_receptive_field_attention_leaves_the_running_statistics_alone(cls):
    layer = cls(4, 4).train()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    attention = layer.receptive_field_attention(torch.randn(2, 4, 6, 6))
    assert attention.shape == (2, 4, 9, 6, 6)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["rfa", "rfcbam", "rfca"])
def test_empty_batch_in_training_gives_an_empty_output(name):
    layer = create_conv(name, 4, 6, 3, stride=2).train()
    out = layer(torch.randn(0, 4, 7, 7))
    assert out.shape == (0, 6, 4, 4)
    assert int(layer.feature_bn.num_batches_tracked) == 0


BAD_ARGS = [
    ({"kernel_size": 0}, ValueError, "kernel_size must be a positive integer"),
    ({"kernel_size": -3}, ValueError, "kernel_size must be a positive integer"),
    ({"kernel_size": 3.0}, TypeError, "kernel_size must be a positive integer.*float"),
    ({"kernel_size": None}, TypeError, "kernel_size must be a positive integer.*None"),
    ({"kernel_size": "3"}, TypeError, "kernel_size must be a positive integer.*str"),
    ({"kernel_size": (3, 3, 3)}, ValueError, r"kernel_size .*got 3 values"),
    ({"stride": 0}, ValueError, "stride must be a positive integer"),
    ({"stride": (1,)}, ValueError, r"stride .*got 1 values"),
    ({"stride": 1.5}, TypeError, "stride must be a positive integer"),
    ({"dilation": 0}, ValueError, "dilation must be a positive integer"),
    ({"padding": -1}, ValueError, "padding must be an integer >= 0"),
    ({"padding": "full"}, ValueError, "padding must be an integer >= 0.*'same', 'valid'"),
    ({"in_channels": 0}, ValueError, "in_channels must be a positive integer"),
    ({"out_channels": 2.0}, TypeError, "out_channels must be a positive integer"),
    ({"groups": 0}, ValueError, "groups must be a positive integer"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGS)
@pytest.mark.parametrize("name", list(CONV_LAYERS))
def test_every_layer_rejects_bad_geometry_at_construction(name, kwargs, error, message):
    args = {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "stride": 1} | kwargs
    if name.startswith("rf") and "padding" in kwargs and kwargs["padding"] == "full":
        message = "padding must be"
    with pytest.raises(error, match=message):
        create_conv(name, **args)


def test_factories_reject_names_that_are_not_strings():
    with pytest.raises(TypeError, match=r"conv layer name must be a string.*got NoneType"):
        create_conv(None, 4, 4)
    with pytest.raises(TypeError, match=r"attention layer name must be a string.*got int 3"):
        create_attn(3, 4)


def test_eca_rejects_a_wrong_channel_count():
    eca = ECA(8)
    assert eca(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"ECA\(8\): expected input of shape \(N, 8, H, W\)"):
        eca(torch.randn(2, 16, 4, 4))
