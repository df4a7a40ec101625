"""AWConv2d against nn.Conv2d and against a slow float64 reference of the paper's definition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnconv import AWConv2d, create_conv
from attnconv.functional import default_chunk_size
from attnconv.layers import aw_conv as aw_conv_module
from attnconv.layers import is_attention_conv

pytestmark = pytest.mark.usefixtures("float64_by_default")


# --- the reference: loops over kernel taps, explicit pooling bins, no fold/unfold tricks -------

def reference_attention(layer: AWConv2d, x: torch.Tensor) -> torch.Tensor:
    """A = Pointconv2(relu(Pointconv1(A0))), A0 pooled by explicit adaptive-average bins."""
    n, c, h, w = x.shape
    kh, kw = layer.kernel_size
    a0 = torch.empty(n, c, kh, kw, dtype=x.dtype)
    for i, j in itertools.product(range(kh), range(kw)):
        rows = slice(i * h // kh, math.ceil((i + 1) * h / kh))
        cols = slice(j * w // kw, math.ceil((j + 1) * w / kw))
        a0[:, :, i, j] = x[:, :, rows, cols].mean(dim=(2, 3))
    w1, b1 = layer.pointconv1.weight.flatten(1), layer.pointconv1.bias
    w2, b2 = layer.pointconv2.weight.flatten(1), layer.pointconv2.bias
    hidden = torch.relu(torch.einsum("rc,ncij->nrij", w1, a0) + b1.view(1, -1, 1, 1))
    attn = torch.einsum("qr,nrij->nqij", w2, hidden) + b2.view(1, -1, 1, 1)
    return attn.view(n, *layer.weight.shape)


def reference_forward(layer: AWConv2d, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """O[n, c2, p] = sum_{c1, t} I[n, c1, p + t] * (1 + A[n, c2, c1, t]) * K[c2, c1, t]."""
    kh, kw = layer.kernel_size
    (sh, sw), (dh, dw), g = layer.stride, layer.dilation, layer.groups
    if layer.padding == "valid":
        pads = (0, 0, 0, 0)
    elif layer.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = layer.padding
        pads = (pw, pw, ph, ph)
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    xp = F.pad(x, pads, mode=mode)
    n, c, h, w = xp.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    o = layer.out_channels
    out = torch.zeros(n, g, o // g, out_h, out_w, dtype=x.dtype)
    attended = (1 + attn) * layer.weight  # (n, o, c/g, kh, kw)
    for i, j in itertools.product(range(kh), range(kw)):
        patch = xp[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh,
                   j * dw: j * dw + sw * (out_w - 1) + 1: sw]
        patch = patch.reshape(n, g, c // g, out_h, out_w)
        tap = attended[..., i, j].reshape(n, g, o // g, c // g)
        out += torch.einsum("ngoc,ngchw->ngohw", tap, patch)
    out = out.reshape(n, o, out_h, out_w)
    if layer.bias is not None:
        out = out + layer.bias.view(1, -1, 1, 1)
    return out


def randomise_attention(layer: AWConv2d, seed: int = 0) -> AWConv2d:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return layer


IMPLS = ["chunked", "grouped", "unfold"]

GEOMETRIES = [
    # (in, out, kernel, stride, padding, dilation, groups, bias)
    (4, 6, 3, 1, 1, 1, 1, True),
    (4, 6, 3, 2, 1, 1, 1, False),
    (4, 6, 3, 1, 2, 2, 1, True),
    (6, 4, 3, 1, 1, 1, 2, True),
    (4, 4, 3, 2, 0, 1, 4, False),
    (4, 6, (3, 5), (2, 1), (1, 2), (1, 2), 2, True),
    (4, 6, 1, 1, 0, 1, 1, True),
    (4, 6, 3, 1, "same", 2, 1, True),
    (4, 6, 4, 1, "same", 1, 2, False),
    (4, 6, 3, 1, "valid", 1, 1, True),
]


def make(geometry, **kwargs) -> AWConv2d:
    cin, cout, k, s, p, d, g, b = geometry
    return AWConv2d(cin, cout, k, s, p, d, g, b, **kwargs)


def plain_conv(layer: AWConv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d's own forward on the layer: its weight, bias and geometry, no attention."""
    return nn.Conv2d.forward(layer, x)


# --- 1. equal to nn.Conv2d at initialisation and after from_conv ----------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_fresh_layer_is_the_plain_conv(geometry, impl):
    layer = make(geometry, impl=impl)
    x = torch.randn(3, geometry[0], 9, 11)
    assert torch.count_nonzero(layer.attention(x)) == 0
    torch.testing.assert_close(layer(x), plain_conv(layer, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_from_conv_keeps_the_output(geometry, padding_mode):
    cin, cout, k, s, p, d, g, b = geometry
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, b, padding_mode=padding_mode)
    layer = AWConv2d.from_conv(conv)
    assert layer.weight is not conv.weight
    torch.testing.assert_close(layer.weight, conv.weight, rtol=0, atol=0)
    x = torch.randn(2, cin, 10, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)


def test_from_conv_in_float32_is_bit_close():
    conv = nn.Conv2d(16, 32, 3, padding=1, dtype=torch.float32)
    x = torch.randn(4, 16, 14, 14, dtype=torch.float32)
    torch.testing.assert_close(AWConv2d.from_conv(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_from_conv_keeps_mode_dtype_and_options():
    conv = nn.Conv2d(4, 8, 3, dtype=torch.float32).eval()
    layer = AWConv2d.from_conv(conv, attn_channels=2, impl="unfold")
    assert not layer.training and layer.weight.dtype == torch.float32
    assert layer.attn_channels == 2 and layer.impl == "unfold"
    assert layer.pointconv2.weight.shape == (8 * 4, 2, 1, 1)


# --- 2. random attention: equal to the activation-side definition ----------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_with_random_attention(geometry, padding_mode, impl):
    layer = randomise_attention(make(geometry, padding_mode=padding_mode, impl=impl))
    x = torch.randn(3, geometry[0], 9, 11)
    attn = reference_attention(layer, x)
    assert attn.abs().max() > 0.1
    torch.testing.assert_close(layer.attention(x), attn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer(x), reference_forward(layer, x, attn), rtol=1e-10,
                               atol=1e-12)


# --- 3. samples are independent ---------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_samples_are_independent(impl):
    layer = randomise_attention(AWConv2d(4, 6, 3, padding=1, groups=2, impl=impl))
    x = torch.randn(4, 4, 8, 8)
    out = layer(x)
    changed = x.clone()
    changed[2] = torch.randn(4, 8, 8) * 5
    out_changed = layer(changed)
    torch.testing.assert_close(out_changed[[0, 1, 3]], out[[0, 1, 3]], rtol=0, atol=1e-12)
    assert (out_changed[2] - out[2]).abs().max() > 1e-3
    one_by_one = torch.cat([layer(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(one_by_one, out, rtol=1e-12, atol=1e-12)


# --- 4. gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("geometry", [(4, 4, 3, 2, 1, 1, 2, True), (3, 2, 3, 1, 2, 2, 1, True)])
def test_gradcheck_input_and_every_parameter(impl, geometry):
    layer = randomise_attention(make(geometry, attn_channels=2, impl=impl))
    x = torch.randn(2, geometry[0], 6, 5, requires_grad=True)
    params = tuple(layer.parameters())
    assert len(params) == 6

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(dict(layer.named_parameters()), ps,
                                                               strict=True)),
                                          (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_gradcheck_chunked_across_chunks(chunk_size):
    layer = randomise_attention(AWConv2d(4, 4, 3, 2, 1, 1, 2, attn_channels=2, impl="chunked",
                                         chunk_size=chunk_size))
    x = torch.randn(3, 4, 6, 5, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


def gradients(layer: AWConv2d, x: torch.Tensor, grad_out: torch.Tensor,
              run: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the input and every parameter of ``layer``, run as ``run`` if given."""
    x = x.detach().requires_grad_(True)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((layer if run is None else run)(x), [x, *params.values()], grad_out)
    return dict(zip(["input", *params], grads, strict=True))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_chunked_gradients_match_plain_autograd(geometry, padding_mode):
    layer = randomise_attention(make(geometry, padding_mode=padding_mode, impl="grouped"))
    x = torch.randn(5, geometry[0], 9, 11)
    grad_out = torch.randn_like(layer(x))
    expected = gradients(layer, x, grad_out)
    assert len(expected) == 1 + len(list(layer.parameters()))
    for chunk_size in (1, 2, None):
        layer.impl, layer.chunk_size = "chunked", chunk_size
        actual = gradients(layer, x, grad_out)
        for name, grad in expected.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(actual[name], grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("geometry", GEOMETRIES[:6])
def test_chunk_size_does_not_change_results(geometry):
    layer = randomise_attention(make(geometry, impl="chunked"))
    x = torch.randn(7, geometry[0], 10, 9)
    grad_out = None
    results = {}
    for chunk_size in (1, 3, 7):  # 3 leaves a short last chunk; 7 is the whole batch
        layer.chunk_size = chunk_size
        out = layer(x)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        results[chunk_size] = (out, gradients(layer, x, grad_out))
    for chunk_size in (3, 7):
        torch.testing.assert_close(results[chunk_size][0], results[1][0], rtol=1e-12, atol=1e-12)
        for name, grad in results[1][1].items():
            torch.testing.assert_close(results[chunk_size][1][name], grad, rtol=1e-11,
                                       atol=1e-12)


def test_functional_default_chunk_size_fits_the_cache_on_cpu():
    small, large = torch.empty(8, 8, 3, 3), torch.empty(256, 256, 3, 3, dtype=torch.float32)
    medium = torch.empty(64, 64, 3, 3, dtype=torch.float32)  # 147 kB per sample
    assert default_chunk_size(32, small) == 32
    assert default_chunk_size(32, medium) == 32
    assert default_chunk_size(256, medium) == 14
    assert default_chunk_size(32, large) == 1
    assert default_chunk_size(0, large) == 1


def test_auto_impl_chunks_only_kernels_that_outgrow_the_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(aw_conv_module, "aw_conv2d",
                        lambda *args: calls.append(args) or torch.zeros(()))
    layer = AWConv2d(256, 256, 3, padding=1, dtype=torch.float32)
    assert layer.impl == "auto"
    layer(torch.randn(3, 256, 4, 4, dtype=torch.float32))  # 7 MB of kernels: one grouped conv
    assert not calls
    layer(torch.randn(4, 256, 4, 4, dtype=torch.float32))  # 9.4 MB: chunked
    assert len(calls) == 1


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        AWConv2d(4, 4, 3, chunk_size=0)


def test_attention_parameters_get_gradients_from_a_fresh_layer():
    layer = AWConv2d(4, 4, 3, padding=1)
    layer(torch.randn(2, 4, 6, 6)).square().sum().backward()
    assert layer.pointconv2.weight.grad.abs().max() > 0
    assert layer.pointconv2.bias.grad.abs().max() > 0


# --- 5. paths, memory layouts, batch sizes, dtypes --------------------------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_grouped_and_unfold_paths_agree(geometry):
    layer = randomise_attention(make(geometry, impl="grouped"))
    x = torch.randn(5, geometry[0], 13, 7)
    grouped = layer(x)
    layer.impl = "unfold"
    torch.testing.assert_close(layer(x), grouped, rtol=1e-10, atol=1e-12)
    layer.impl = "chunked"
    torch.testing.assert_close(layer(x), grouped, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_channels_last_non_contiguous_and_odd_sizes(impl):
    layer = randomise_attention(AWConv2d(4, 6, 3, 2, 1, impl=impl))
    x = torch.randn(3, 4, 13, 9)
    expected = reference_forward(layer, x, reference_attention(layer, x))
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), expected)
    wide = torch.randn(3, 4, 13, 18)[..., ::2]
    assert not wide.is_contiguous()
    torch.testing.assert_close(layer(wide),
                               reference_forward(layer, wide, reference_attention(layer, wide)))
    layer = layer.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_of_one_and_empty_batch(impl):
    layer = randomise_attention(AWConv2d(4, 6, 3, 2, 1, impl=impl))
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(layer(x), reference_forward(layer, x, reference_attention(layer, x)))
    empty = layer(torch.randn(0, 4, 7, 7))
    assert empty.shape == (0, 6, 4, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_train_and_eval_mode_agree(impl):
    layer = randomise_attention(AWConv2d(4, 6, 3, padding=1, impl=impl))
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(layer.train()(x), layer.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_matches_float64(dtype, tol, impl):
    layer = randomise_attention(AWConv2d(8, 8, 3, padding=1, impl=impl))
    x = torch.randn(2, 8, 10, 10)
    expected = layer(x)
    out = layer.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    atol = tol * expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=atol)


def test_torch_compile_matches_eager():
    layer = randomise_attention(AWConv2d(4, 6, 3, padding=1)).float()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float32)
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_backward_of_the_chunked_path_matches_eager():
    layer = randomise_attention(AWConv2d(4, 6, 3, padding=1, impl="chunked",
                                         chunk_size=2)).float()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float32)
    grad_out = torch.randn(3, 6, 8, 8, dtype=torch.float32)
    expected = gradients(layer, x, grad_out)
    actual = gradients(layer, x, grad_out, run=torch.compile(layer))
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5)


# --- 6. errors ---------------------------------------------------------------------------------

def test_wrong_input_is_rejected_with_the_layer_and_the_expected_shape():
    layer = AWConv2d(4, 6, 3)
    with pytest.raises(ValueError, match=r"AWConv2d\(4, 6.*expected input of shape \(N, 4, H, W\)"
                                         r", got \(2, 5, 8, 8\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"expected input .*, got \(4, 8, 8\)"):
        layer(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="expected input of shape"):
        layer.attention(torch.randn(8, 8))


def test_integer_input_is_refused_and_reset_attention_restores_a_zero_attention():
    layer = AWConv2d(4, 6, 3)
    assert is_attention_conv(layer)
    with pytest.raises(TypeError, match=r"AWConv2d\(4, 6.*expected a floating-point input"):
        layer(torch.ones(2, 4, 8, 8, dtype=torch.int64))
    nn.init.kaiming_normal_(layer.pointconv2.weight)  # what a network's conv init does
    layer.reset_attention()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(layer(x), plain_conv(layer, x))


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=0), "in_channels must be a positive integer"),
    (dict(out_channels=-1), "out_channels must be a positive integer"),
    (dict(kernel_size=(3, 0)), "kernel_size must be a positive integer"),
    (dict(stride=0), "stride must be a positive integer"),
    (dict(dilation=0), "dilation must be a positive integer"),
    (dict(groups=0), "groups must be a positive integer"),
    (dict(attn_channels=0), "attn_channels must be a positive integer"),
    (dict(groups=3), "AWConv2d: in_channels must be divisible by groups"),
    (dict(padding="same", stride=2), "AWConv2d: padding='same' is not supported for strided"),
    (dict(impl="fold"), "impl must be one of"),
])
def test_bad_constructor_arguments(kwargs, message):
    args = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=message):
        AWConv2d(**args)


def test_from_conv_rejects_other_modules():
    with pytest.raises(TypeError, match=r"expects an nn\.Conv2d, got Linear"):
        AWConv2d.from_conv(nn.Linear(2, 2))


# --- 7. properties over random geometries -------------------------------------------------------

@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if draw(st.booleans()):
        stride, padding = (1, 1), draw(st.sampled_from(["same", "valid"]))
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    bias = draw(st.booleans())
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    height = draw(st.integers(max(1, reach[0]), 12))
    width = draw(st.integers(max(1, reach[1]), 12))
    batch = draw(st.integers(1, 3))
    impl = draw(st.sampled_from(IMPLS))
    return (cin, cout, kernel, stride, padding, dilation, groups, bias), (batch, cin, height,
                                                                         width), impl


@settings(max_examples=60, deadline=None)
@given(geometries(), st.integers(0, 2**16))
def test_property_plain_at_init_and_reference_with_attention(case, seed):
    geometry, shape, impl = case
    torch.manual_seed(seed)
    layer = make(geometry, attn_channels=3, impl=impl)
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x), plain_conv(layer, x), rtol=0, atol=1e-12)
    randomise_attention(layer, seed)
    torch.testing.assert_close(layer(x), reference_forward(layer, x, reference_attention(layer, x)),
                               rtol=1e-10, atol=1e-11)


# --- parameter budget and factory ----------------------------------------------------------------

def test_resnet50_with_aw_in_every_bottleneck_3x3_adds_at_most_25_percent():
    from torchvision.models import resnet50

    model = resnet50()
    base = sum(p.numel() for p in model.parameters())
    for block in (b for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
                  for b in stage):
        block.conv2 = AWConv2d.from_conv(block.conv2)
    added = sum(p.numel() for p in model.parameters()) - base
    # 16 layers: (R + 1) * sum(C_out * C_in) + R * sum(C_in) + 16 R, with R = 4.
    assert added == 5 * 1_257_472 + 4 * 3776 + 16 * 4
    assert 0.24 < added / base <= 0.25


def test_create_conv_builds_aw_and_names_unknown_layers():
    layer = create_conv("aw", 8, 16, 3, 2, padding=1, attn_channels=2)
    assert isinstance(layer, AWConv2d) and layer.stride == (2, 2) and layer.attn_channels == 2
    assert type(create_conv("conv", 8, 16, 3)) is nn.Conv2d
    with pytest.raises(ValueError, match=r"unknown conv layer 'awe'.*did you mean 'aw'"):
        create_conv("awe", 8, 16)
