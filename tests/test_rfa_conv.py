"""RFAConv2d, RFCBAMConv2d, RFCAConv2d against faithful float64 references of the official
modules (attnconv/testing/reference_rfa.py: rearrange + stride-k conv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomise
from torch import nn
from torch.func import functional_call

from attnconv import RFAConv2d, RFCAConv2d, RFCBAMConv2d, create_conv
from attnconv.analysis.profiling import saved_tensor_bytes
from attnconv.testing.reference_rfa import OfficialRFAConv, OfficialRFCAConv, OfficialRFCBAMConv

pytestmark = pytest.mark.usefixtures("float64_by_default")


PAIRS = {  # layer -> (official reference, its constructor's extra kwargs)
    RFAConv2d: OfficialRFAConv,
    RFCBAMConv2d: OfficialRFCBAMConv,
    RFCAConv2d: OfficialRFCAConv,
}
LAYERS = list(PAIRS)




def make_pair(cls, cin=6, cout=5, k=3, stride=1, trailing=False, seed=0):
    ref = randomise(PAIRS[cls](cin, cout, k, stride, trailing_bn_relu=trailing), seed)
    layer = cls(cin, cout, k, stride)
    assert layer.load_official_state_dict(ref.state_dict()) == {} or trailing
    return ref, layer


def run(module: nn.Module, x: torch.Tensor):
    """Output and input gradient for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    grad_out = torch.linspace(-1, 1, out.numel()).view(out.shape)
    out.backward(grad_out)
    return out.detach(), x.grad


def assert_same_parameter_grads(ref: nn.Module, layer) -> None:
    ref_params = dict(ref.named_parameters())
    for key, (tensor, _) in layer.official_keys().items():
        if key in ref_params:
            torch.testing.assert_close(tensor.grad.reshape(ref_params[key].shape),
                                       ref_params[key].grad, msg=key)


# --- 1. equal to the official module: outputs, gradients, BN statistics --------------------

@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 7, 9), (1, 6, 5, 6)])
def test_matches_official_module(cls, stride, train, shape):
    ref, layer = make_pair(cls, stride=stride)
    ref.train(train)
    layer.train(train)
    x = torch.randn(shape)
    out_ref, grad_ref = run(ref, x)
    out, grad = run(layer, x)
    assert out.shape == nn.Conv2d(6, 5, 3, stride, 1)(x).shape
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert_same_parameter_grads(ref, layer)
    ref_state = ref.state_dict()
    for key, (tensor, _) in layer.official_keys().items():  # running statistics included
        torch.testing.assert_close(tensor.reshape(ref_state[key].shape), ref_state[key], msg=key)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_no_grad_path_equals_autograd_path(cls, train):
    _, layer = make_pair(cls, stride=2)
    x = torch.randn(2, 6, 9, 8)
    layer.train(train)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        fast = layer(x)
    layer.load_state_dict(state)
    torch.testing.assert_close(fast, layer(x.requires_grad_(True)).detach())


@pytest.mark.parametrize("cls", LAYERS)
def test_kernel_5_and_wide_rfca(cls):
    kwargs = {"reduction": 2} if cls is RFCAConv2d else {}
    layer = cls(16, 4, 5, 2, **kwargs)
    ref = PAIRS[cls](16, 4, 5, 2, **kwargs)
    randomise(ref)
    layer.load_official_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 9, 7)
    for train in (True, False):
        ref.train(train)
        layer.train(train)
        torch.testing.assert_close(run(layer, x), run(ref, x))


def test_batchnorm_momentum_none_and_counter_follow_nn_batchnorm():
    ref, layer = make_pair(RFAConv2d)
    ref.generate_feature[1].momentum = None
    layer.feature_bn.momentum = None
    for seed in range(3):
        x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(seed))
        ref(x)
        layer(x)
    bn_ref = ref.generate_feature[1]
    assert int(layer.feature_bn.num_batches_tracked) == int(bn_ref.num_batches_tracked)
    torch.testing.assert_close(layer.feature_bn.running_var, bn_ref.running_var)
    torch.testing.assert_close(layer.feature_bn.running_mean, bn_ref.running_mean)


def test_single_value_per_channel_in_training_is_rejected():
    with pytest.raises(ValueError, match=r"RFAConv2d\(.*more than 1 value per channel"):
        RFAConv2d(4, 4)(torch.randn(1, 4, 1, 1))


# --- 2. importing the official state dicts ---------------------------------------------------

@pytest.mark.parametrize("cls", LAYERS)
def test_model_py_layout_returns_the_trailing_batchnorm(cls):
    ref, layer = make_pair(cls, trailing=True)
    trailing = layer.load_official_state_dict(ref.state_dict())
    assert sorted(trailing) == [f"conv.1.{n}" for n in
                                ("bias", "num_batches_tracked", "running_mean", "running_var",
                                 "weight")]
    ref.eval()
    layer.eval()
    x = torch.randn(2, 6, 7, 7)
    out = F.batch_norm(layer(x), trailing["conv.1.running_mean"], trailing["conv.1.running_var"],
                       trailing["conv.1.weight"], trailing["conv.1.bias"])
    torch.testing.assert_close(F.relu(out), ref(x))


@pytest.mark.parametrize("cls", LAYERS)
def test_bad_official_state_dicts_name_the_keys(cls):
    ref, layer = make_pair(cls)
    state = ref.state_dict()
    missing = {k: v for k, v in state.items() if k != "conv.0.bias"}
    with pytest.raises(ValueError, match=r"missing keys \['conv.0.bias'\]"):
        layer.load_official_state_dict(missing)
    with pytest.raises(ValueError, match=r"mis-shaped keys \[conv.0.weight: expected "
                                         r"\(5, 6, 3, 3\), got \(5, 6, 1, 1\)"):
        layer.load_official_state_dict({**state, "conv.0.weight": torch.zeros(5, 6, 1, 1)})
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        layer.load_official_state_dict({**state, "extra": torch.zeros(1)})
    without_bias = cls(6, 5, bias=False)
    with pytest.raises(ValueError, match=r"unexpected keys \['conv.0.bias'\]"):
        without_bias.load_official_state_dict(state)


# --- 3. the official defects: rejected with the layer's name ---------------------------------

@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kernel_size": 4}, "kernel_size must be odd"),
    ({"kernel_size": (3, 5)}, "kernel_size must be odd and square"),
    ({"padding": 0}, "padding must be None or kernel_size // 2 = 1"),
    ({"padding": 2}, "padding must be None or kernel_size // 2"),
    ({"dilation": 2}, "dilation must be 1"),
    ({"groups": 2}, "groups must be 1"),
    ({"in_channels": 0}, "in_channels must be a positive integer"),
])
def test_official_defects_are_rejected(cls, kwargs, message):
    args = {"in_channels": 4, "out_channels": 4, **kwargs}
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {message}"):
        cls(**args)


@pytest.mark.parametrize("cls", LAYERS)
def test_padding_k_over_2_is_accepted_in_any_spelling(cls):
    for padding in (None, 1, (1, 1)):
        assert cls(4, 4, 3, padding=padding).padding == (1, 1)


@pytest.mark.parametrize("cls", LAYERS)
def test_bad_input_is_rejected_with_the_layer(cls):
    layer = cls(4, 6)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(4, 6.*expected input of shape "
                                         r"\(N, 4, H, W\), got \(2, 5, 8, 8\)"):
        layer(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match=r"got \(4, 8, 8\)"):
        layer(torch.randn(4, 8, 8))


# --- 4. autograd, layouts, compile, memory ---------------------------------------------------

@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("train", [True, False])
def test_gradcheck_input_and_every_parameter(cls, train):
    layer = randomise(cls(3, 2, 3, 2)).train(train)
    names, params = zip(*layer.named_parameters(), strict=True)
    x = torch.randn(2, 3, 5, 4, requires_grad=True)

    def fn(x, *values):
        return functional_call(layer, dict(zip(names, values, strict=True)), (x,))

    inputs = (x, *[p.detach().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("cls", LAYERS)
def test_channels_last_input_and_layer(cls):
    ref, layer = make_pair(cls, stride=2)
    x = torch.randn(2, 6, 9, 7)
    expected = run(ref, x)
    got = run(layer.to(memory_format=torch.channels_last),
              x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected)
    assert_same_parameter_grads(ref, layer)


@pytest.mark.parametrize("cls", LAYERS)
def test_torch_compile_matches_eager(cls):
    _, layer = make_pair(cls)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, 7, 7)
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.train()
    expected = run(layer, x)
    layer.load_state_dict(state)
    torch.testing.assert_close(run(compiled, x), expected)


def test_rfaconv_keeps_at_most_12x_the_input_for_backward():
    x = torch.randn(2, 8, 16, 16, dtype=torch.float32)
    layer = RFAConv2d(8, 8, dtype=torch.float32)
    assert saved_tensor_bytes(layer, x) <= 12 * x.numel() * x.element_size()
    official = OfficialRFAConv(8, 8, 3).float()
    assert saved_tensor_bytes(official, x) > 30 * x.numel() * x.element_size()


@pytest.mark.parametrize("name", ["rfa", "rfcbam", "rfca"])
def test_create_conv_builds_the_rfa_family_with_conv_kwargs(name):
    layer = create_conv(name, 8, 16, 3, stride=2, padding=1, bias=False)
    assert type(layer).__name__.lower().startswith(name)
    assert layer.weight.shape == (16, 8, 3, 3) and layer.bias is None
    assert layer(torch.randn(2, 8, 9, 9)).shape == (2, 16, 5, 5)


@pytest.mark.parametrize("cls", LAYERS)
def test_output_keeps_the_input_memory_format(cls):
    layer = cls(4, 6, 3, 2)
    x = torch.randn(2, 4, 7, 7)
    assert layer(x).is_contiguous()
    out = layer(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
