"""The shared network machinery, exercised through a toy family that only declares its factors.

``ProjectedModule`` is shaped like Light LoRA (``lora_down = down_train @ down_aux``, aux frozen):
everything else it does (forward, merge, restore, max-norm, LoRA+ groups) comes from the base.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.base import (
    TEXT_ENCODER_PARENTS,
    UNET_CONV_PARENTS,
    UNET_TRANSFORMER_PARENTS,
    LowRankModule,
    Network,
    NetworkStateError,
    block_index,
    find_targets,
)
from networks.network_args import NetworkArgs, NetworkError
from tests.networks.tolerances import assert_close

# ---- a toy model whose classes carry diffusers' / transformers' names (matching is by class name) ----


class Transformer2DModel(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.proj_in = nn.Conv2d(width, width, 1)
        self.to_q = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


class ResnetBlock2D(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)


class CLIPAttention(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.q_proj = nn.Linear(width, width)


class CLIPAttentionFlash(CLIPAttention):
    """A future subclass: still a CLIPAttention."""


class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def toy_unet():
    block = Holder(attentions=nn.ModuleList([Transformer2DModel()]), resnets=nn.ModuleList([ResnetBlock2D()]))
    return Holder(
        down_blocks=nn.ModuleList([block]), mid_block=Holder(attentions=nn.ModuleList([Transformer2DModel()]))
    )


def toy_text_encoder(flat=False):
    layers = nn.ModuleList([Holder(self_attn=CLIPAttention()), Holder(self_attn=CLIPAttentionFlash())])
    inner = Holder(encoder=Holder(layers=layers))
    return inner if flat else Holder(text_model=inner)


def is_layer(name, module):
    return isinstance(module, (nn.Linear, nn.Conv2d))


# ---- the toy family ----


class ProjectedModule(LowRankModule):
    """lora_down = down_train @ down_aux (frozen buffer), lora_up = lora_up_train."""

    def __init__(self, name, original, rank, alpha, aux=3, **kwargs):
        super().__init__(name, original, rank, alpha, **kwargs)
        out_features, fan_in = original.weight.shape[0], original.weight[0].numel()
        self.register_buffer("down_aux", torch.randn(aux, fan_in), persistent=False)
        self.down_train = nn.Parameter(torch.randn(rank, aux))
        self.lora_up_train = nn.Parameter(torch.randn(out_features, rank))

    def down_weight(self):
        return (self.down_train @ self.down_aux).view(self.lora_dim, *self.original.weight.shape[1:])

    def up_weight(self):
        return self.lora_up_train.view(*self.lora_up_train.shape, *([1, 1] if self.is_conv else []))


def toy_network(unet, text_encoder=None, args=None, rank=2, alpha=1.0, **kwargs):
    targets = find_targets(text_encoder, unet, UNET_TRANSFORMER_PARENTS + UNET_CONV_PARENTS, is_layer)
    modules = [ProjectedModule(t.name, t.module, rank, alpha, **kwargs) for t in targets]
    return Network("tests.toy", modules, args or NetworkArgs(), rank, alpha)


def reference_delta(module):
    """ΔW from the family's own definition, in float64: alpha/rank · up @ (down_train @ down_aux)."""
    down = (module.down_train.double() @ module.down_aux.double()).view(module.lora_dim, -1)
    up = module.lora_up_train.double()
    return (up @ down).view(module.original.weight.shape) * (module.alpha.double() / module.lora_dim)


# ---- target discovery ----


@pytest.mark.parametrize(
    "name, block",
    [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", 1),  # IN01
        ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q", 2),  # IN02
        ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),  # IN03
        ("lora_unet_down_blocks_3_resnets_1_conv2", 11),  # IN11
        ("lora_unet_mid_block_attentions_0_proj_out", 12),  # MID
        ("lora_unet_up_blocks_0_resnets_0_conv1", 13),  # OUT00
        ("lora_unet_up_blocks_1_upsamplers_0_conv", 18),  # OUT05, shared with resnets_2
        ("lora_unet_up_blocks_3_attentions_2_proj_out", 24),  # OUT11
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", -1),
    ],
)
def test_block_index_follows_kohyas_block_numbering(name, block):
    assert block_index(name) == block


def test_targets_are_found_by_class_name_with_kohya_names():
    names = [t.name for t in find_targets(toy_text_encoder(), toy_unet(), UNET_TRANSFORMER_PARENTS, is_layer)]
    assert names == [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj",  # subclass of CLIPAttention
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_to_q",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_to_q",
    ]


def test_text_encoder_names_keep_text_model_when_the_tree_lacks_it():
    nested = find_targets(toy_text_encoder(), None, (), is_layer)
    flat = find_targets(toy_text_encoder(flat=True), None, (), is_layer)
    assert [t.name for t in flat] == [t.name for t in nested]


def test_target_lists_cannot_be_mutated():
    assert all(isinstance(x, tuple) for x in (UNET_TRANSFORMER_PARENTS, UNET_CONV_PARENTS, TEXT_ENCODER_PARENTS))


def test_an_empty_network_is_an_error():
    with pytest.raises(NetworkError, match="empty"):
        toy_network(Holder(linear=nn.Linear(2, 2)))


# ---- the module contract ----


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(6, 5), (2, 7, 6)),
        (nn.Conv2d(6, 5, 1), (2, 6, 4, 4)),
        (nn.Conv2d(6, 5, 3, padding=1), (2, 6, 4, 4)),
        (nn.Conv2d(6, 5, 3, stride=2, padding=1), (2, 6, 5, 5)),
    ],
)
def test_a_family_that_declares_factors_gets_forward_merge_and_restore(layer, shape):
    x = torch.randn(shape, dtype=torch.float64)
    layer.double()
    module = ProjectedModule("lora_unet_x", layer, rank=2, alpha=3.0).double()
    base = layer(x)
    module.apply()
    adapted = layer(x)
    delta = reference_delta(module)
    op = F.linear(x, delta) if isinstance(layer, nn.Linear) else F.conv2d(x, delta, None, layer.stride, layer.padding)
    torch.testing.assert_close(adapted, base + op)
    assert not torch.allclose(adapted, base)
    module.restore()
    assert torch.equal(layer(x), base)
    module.merge_()
    torch.testing.assert_close(layer(x), adapted)


def test_patching_leaves_the_base_model_tree_and_keys_alone():
    unet = toy_unet()
    keys, modules = list(unet.state_dict()), [n for n, _ in unet.named_modules()]
    network = toy_network(unet)
    network.apply_to(None, unet)
    assert list(unet.state_dict()) == keys and [n for n, _ in unet.named_modules()] == modules
    assert not any(k.startswith("_original") for k in network.state_dict())


def test_stacked_networks_restore_last_first():
    unet = Holder(t=Transformer2DModel())
    layer = unet.t.to_q
    x = torch.randn(3, 8)
    base = layer(x)
    first, second = toy_network(unet), toy_network(unet)
    first.apply_to(None, unet)
    with_first = layer(x)
    second.apply_to(None, unet)
    assert not torch.allclose(layer(x), with_first)
    with pytest.raises(NetworkStateError, match="another network was applied over this one; restore it first"):
        first.restore()  # it would drop second's patch and leave second's forward calling a restored module
    assert not torch.allclose(layer(x), with_first)
    second.restore()
    assert torch.equal(layer(x), with_first)
    first.restore()
    assert torch.equal(layer(x), base)


def test_applying_twice_and_merging_while_applied_are_refused():
    unet = toy_unet()
    network = toy_network(unet)
    network.apply_to(None, unet)
    with pytest.raises(NetworkStateError, match="already applied"):
        network.apply_to(None, unet)
    with pytest.raises(NetworkStateError, match="restore"):
        network.merge_to(None, unet)


def test_max_norm_rescales_like_kohya():
    unet = toy_unet()
    network = toy_network(unet)
    modules = network.adapters
    norms = [reference_delta(m).norm().item() for m in modules]
    limit = sorted(norms)[1] * 1.01  # the largest ones exceed it
    before = [reference_delta(m) for m in modules]
    scaled, mean, largest = network.apply_max_norm_regularization(limit, "cpu")
    expected = [min(n, limit) for n in norms]
    assert scaled == sum(n > limit for n in norms) > 0
    assert mean == pytest.approx(sum(expected) / len(expected)) and largest == pytest.approx(max(expected))
    for module, old, norm in zip(modules, before, norms):
        torch.testing.assert_close(reference_delta(module), old * min(1.0, limit / norm))


def test_delta_norm_matches_the_materialised_delta():
    for module in toy_network(toy_unet()).adapters:
        assert module.delta_norm().item() == pytest.approx(reference_delta(module).norm().item(), rel=1e-5)


def test_loraplus_groups_take_the_familys_up_parameters():
    network = toy_network(toy_unet(), args=NetworkArgs(loraplus_lr_ratio=8.0))
    groups, descriptions = network.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert descriptions == ["unet", "unet plus"]
    assert [g["lr"] for g in groups] == [1e-4, 8e-4]
    assert {id(p) for p in groups[1]["params"]} == {id(m.lora_up_train) for m in network.adapters}


def test_half_precision_model_runs_a_float32_network_without_autocast():
    unet = Holder(t=Transformer2DModel()).to(torch.bfloat16)
    network = toy_network(unet)
    network.apply_to(None, unet)
    x = torch.randn(4, 8)
    out = unet.t.to_q(x.to(torch.bfloat16))
    expected = F.linear(x, unet.t.to_q.weight.float(), unet.t.to_q.bias.float())
    expected = expected + F.linear(x, reference_delta(network.adapters[1]).float())
    assert out.dtype == torch.bfloat16
    assert_close(out, expected.to(torch.bfloat16))


def test_training_hooks_and_multiplier():
    unet = Holder(t=Transformer2DModel())
    network = toy_network(unet)
    network.requires_grad_(False).eval()
    network.prepare_grad_etc(None, unet)
    network.on_epoch_start(None, unet)
    assert network.training and list(network.get_trainable_params()) == list(network.parameters())
    assert network.is_mergeable()
    network.apply_to(None, unet)
    x = torch.randn(3, 8)
    full = unet.t.to_q(x)
    network.set_multiplier(0.0)
    base = unet.t.to_q(x)
    network.set_multiplier(0.25)
    assert_close(unet.t.to_q(x), base + 0.25 * (full - base))


def test_a_network_refuses_models_it_was_not_built_on():
    network = toy_network(toy_unet())
    with pytest.raises(NetworkStateError, match="built on another U-Net"):
        network.apply_to(None, toy_unet())
    with pytest.raises(NetworkStateError, match="built on another U-Net"):
        network.merge_to(None, toy_unet())


class Replacement(ProjectedModule):
    MERGEABLE = False  # a family whose modules replace layers instead of adding a delta


def test_merge_and_max_norm_refuse_families_without_delta_weights():
    unet = toy_unet()
    targets = find_targets(None, unet, UNET_TRANSFORMER_PARENTS, is_layer)
    network = Network("tests.replace", [Replacement(t.name, t.module, 2, 1.0) for t in targets], NetworkArgs(), 2, 1.0)
    assert not network.is_mergeable()
    with pytest.raises(NetworkStateError, match="merge_to needs delta weights"):
        network.merge_to(None, unet)
    with pytest.raises(NetworkStateError, match="--scale_weight_norms needs delta weights, which tests.replace"):
        network.apply_max_norm_regularization(1.0, "cpu")
