"""The model zoo: timm's model contract, parameter counts, weight compatibility, names."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from helpers import official_rfa_resnet18_state_dict

import attnconv
from attnconv import AWConv2d, RFAConv2d, create_model
from attnconv.analysis.profiling import count_params
from attnconv.models import MODEL_ARGS, ZOO_MODELS, load_official_rfa_checkpoint

SMALL = dict(cifar_stem=True, channels=(8, 16, 32, 64), num_classes=10)


def _millions(model: torch.nn.Module) -> float:
    return round(count_params(model) / 1e6, 2)


@pytest.mark.parametrize(("name", "millions"), [
    ("resnet18", 11.69),
    ("resnet34", 21.80),
    ("resnet50", 25.56),
    # AW, attn_channels R = 4: Pointconv2 adds (R + 1) * C_out * C_in per 3x3 conv.
    ("resnet50_aw", 31.86),
    # RFAConv README (official code, final conv with bias).
    ("resnet18_rfa", 11.85),
    ("resnet18_rfcbam", 11.88),
    ("resnet18_rfca", 11.89),
    ("resnet34_rfa", 22.16),
    ("resnet18_camconv", 11.75),
    ("resnet18_cbamconv", 11.75),
    ("resnet18_caconv", 11.74),
])
def test_parameter_counts_at_imagenet_size(name: str, millions: float) -> None:
    assert _millions(create_model(name)) == millions


def test_plain_resnet_matches_timm_and_torchvision_state_dicts() -> None:
    ours = create_model("resnet18").state_dict()
    theirs = timm.create_model("resnet18").state_dict()
    tv = torchvision.models.resnet18().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tv.items()}


@pytest.mark.parametrize("name", ["resnet18_aw", "resnet50_aw"])
def test_torchvision_weights_load_with_only_attention_missing(name: str) -> None:
    weights = getattr(torchvision.models, name.split("_")[0])().state_dict()
    model = create_model(name)
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    new = set(model.state_dict()) - set(weights)
    assert set(result.missing_keys) == new
    assert new and all(".pointconv" in key for key in new)
    replaced = model.block_conv_names()
    assert all(isinstance(model.get_submodule(n), AWConv2d) for n in replaced)
    assert torch.equal(model.get_submodule(replaced[-1]).weight, weights[replaced[-1] + ".weight"])


@pytest.mark.parametrize("name", ["resnet18_rfa", "resnet18_cbamconv", "resnet50_rfa"])
def test_torchvision_weights_load_into_rfa_family_with_only_new_parameters_missing(
        name: str) -> None:
    weights = getattr(torchvision.models, name.split("_")[0])().state_dict()
    model = create_model(name)
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    # BatchNorm fills in a missing num_batches_tracked without reporting it
    new = {k for k in set(model.state_dict()) - set(weights)
           if not k.endswith("num_batches_tracked")}
    assert set(result.missing_keys) == new
    replaced = tuple(f"{n}." for n in model.block_conv_names())
    assert all(key.startswith(replaced) for key in result.missing_keys)
    # the kernel is the final conv's weight, under the torchvision name
    assert not any(key.endswith(".conv1.weight") for key in result.missing_keys)


def test_se_and_cbam_variants_place_attention_before_the_residual_add() -> None:
    se = create_model("resnet50_se_aw")
    timm_se = timm.create_model("seresnet50")
    result = se.load_state_dict(timm_se.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(".pointconv" in key for key in result.missing_keys)
    assert isinstance(se.layer1[0].se, attnconv.SE)
    assert isinstance(create_model("resnet50_cbam").layer4[2].se, attnconv.CBAM)
    assert _millions(create_model("seresnet50")) == _millions(timm_se) == 28.09


def test_aw_resnet_equals_plain_resnet_with_the_same_weights() -> None:
    torch.manual_seed(0)
    plain = create_model("resnet18", **SMALL).eval()
    for module in plain.modules():  # non-trivial BN statistics, so the test sees every path
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    aw = create_model("resnet18_aw", **SMALL).eval()
    assert aw.load_state_dict(plain.state_dict(), strict=False).unexpected_keys == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, actual = plain(x), aw(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.01


def test_aw_attention_starts_at_zero_after_timm_init() -> None:
    model = create_model("resnet18_aw", **SMALL)
    layers = [m for m in model.modules() if isinstance(m, AWConv2d)]
    assert len(layers) == 8
    assert all(not m.pointconv2.weight.any() and not m.pointconv2.bias.any() for m in layers)
    assert all(m.pointconv1.weight.std() > 0 for m in layers)


def test_rfa_logit_scale_starts_as_in_the_official_resnets() -> None:
    model = create_model("resnet34_rfa")
    layers = [m for m in model.modules() if isinstance(m, RFAConv2d)]
    assert len(layers) == 16
    for layer in layers:
        # Kaiming-normal, std sqrt(2 / (C * k2)): 0.02 at C = 512, where U(-1, 1) gives 0.58
        std = math.sqrt(2 / layer.attn_logit_scale.numel())
        assert abs(layer.attn_logit_scale.std().item() - std) < 0.25 * std


def test_every_3x3_placement_replaces_both_basic_block_convs() -> None:
    model = create_model("resnet18", conv_layer="aw", conv_placement="every_3x3", **SMALL)
    assert sum(isinstance(m, AWConv2d) for m in model.modules()) == 16
    with pytest.raises(ValueError, match="conv_placement"):
        create_model("resnet18", conv_placement="stem")


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_names_build_through_timm_with_pretrained_cfg(name: str) -> None:
    model = timm.create_model(name, layers=(1, 1, 1, 1), **SMALL)  # one block a stage: fast
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["num_classes"] == 1000
    assert model.num_classes == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_zoo_names_do_not_collide_with_timm() -> None:
    code = ("import timm; before = set(timm.list_models()); import attnconv.models as m; "
            "print(sorted(set(m.ZOO_MODELS) & before)); "
            "print(all(n in timm.list_models() for n in m.ZOO_MODELS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"]
    assert set(ZOO_MODELS) <= set(MODEL_ARGS)


def test_timm_contract_forward_head_features_classifier() -> None:
    model = create_model("resnet18_aw", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 64, 4, 4)
        assert model.num_features == 64
        assert model.forward_head(features, pre_logits=True).shape == (2, 64)
        torch.testing.assert_close(model.forward_head(features), model(x))
        model.reset_classifier(5)
        assert model.num_classes == 5
        assert model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, 64)


def test_features_only_channels_and_reductions() -> None:
    model = timm.create_model("resnet50_aw", features_only=True, channels=(8, 16, 32, 64))
    assert model.feature_info.channels() == [64, 32, 64, 128, 256]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        maps = model.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32), (32, 16, 16), (64, 8, 8),
                                                  (128, 4, 4), (256, 2, 2)]
    cifar = timm.create_model("resnet18_aw", features_only=True, out_indices=(1, 4), **SMALL)
    assert cifar.feature_info.reduction() == [1, 8]
    with torch.no_grad():
        assert [m.shape[-1] for m in cifar.eval()(torch.randn(1, 3, 32, 32))] == [32, 4]


def test_cifar_stem_single_channel_input() -> None:
    model = create_model("resnet18_aw", in_chans=1, drop_rate=0.1, **SMALL)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18_aw", **SMALL)
    for module in model.modules():  # give the attention a gradient path of its own
        if isinstance(module, AWConv2d):
            torch.nn.init.normal_(module.pointconv2.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5)


def test_torch_compile_matches_eager() -> None:
    # One block per stage keeps inductor's compile time to a few seconds on 2 cores.
    model = create_model("resnet18_aw", layers=(1, 1, 1, 1), **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet50_wa'; close names: resnet50_aw"):
        attnconv.create_model("resnet50_wa")


def test_official_rfa_checkpoint_round_trips(tmp_path) -> None:
    official = official_rfa_resnet18_state_dict()
    path = tmp_path / "RFAresnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}}, path)
    model = load_official_rfa_checkpoint(create_model("resnet18_rfa"), path)
    layer = model.layer3[0].conv1
    assert isinstance(layer, RFAConv2d) and layer.in_channels == 128
    p = "layer3.0.conv1"
    assert torch.equal(layer.attn_logit_scale, official[f"{p}.get_weight.1.weight"].view(128, 9))
    assert torch.equal(layer.feature_conv.weight, official[f"{p}.generate_feature.0.weight"])
    assert torch.equal(layer.feature_bn.running_var,
                       official[f"{p}.generate_feature.1.running_var"])
    assert torch.equal(layer.weight, official[f"{p}.conv.0.weight"])
    assert torch.equal(layer.bias, official[f"{p}.conv.0.bias"])
    assert torch.equal(model.layer3[0].conv2.weight, official["layer3.0.conv2.weight"])
    assert torch.equal(model.fc.weight, official["fc.weight"])
    with pytest.raises(ValueError, match="unexpected keys"):
        load_official_rfa_checkpoint(create_model("resnet18_rfa"),
                                     dict(official, extra=torch.zeros(1)))
    with pytest.raises(ValueError, match="no official layout"):
        load_official_rfa_checkpoint(create_model("resnet18_aw"), official)


class _Exploit:
    def __reduce__(self):
        return (_mark_pwned, ())


PWNED: list[bool] = []


def _mark_pwned() -> dict:
    PWNED.append(True)
    return {}


def test_official_checkpoint_that_runs_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Exploit()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_official_rfa_checkpoint(create_model("resnet18_rfa"), path)
    assert PWNED == []
