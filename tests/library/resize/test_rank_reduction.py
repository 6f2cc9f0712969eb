"""Resizing LoRA state dicts: against kohya's dense method, ranks, copies, alphas, metadata."""

import pytest
import torch

from library.errors import ConfigError
from library.resize.rank_reduction import ResizeRequest, is_no_op, linear_alpha, resize_state_dict, resized_metadata
from library.synthetic_lora import LoRATarget, random_lora
from networks.lora_file import LoRAFileError
from tests.kohya_reference import dense_delta, dense_svd, dense_truncation, kohya_rank

TARGETS = [
    LoRATarget("lora_te", "text_model.encoder.layers.0.mlp.fc1", 48, 40),
    LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 16, 8, (3, 3), is_conv=True),
    LoRATarget("lora_unet", "down_blocks.0.attentions.0.proj_in", 12, 10, is_conv=True),
    LoRATarget("lora_unet", "up_blocks.0.resnets.0.time_emb_proj", 6, 20),  # rank 8 > out features
]


@pytest.fixture
def lora():
    sd = random_lora(TARGETS, dim=8, alpha=4, conv_dim=6, conv_alpha=3, decay=1.5, seed=3, dtype=torch.float32)
    sd["bundle_emb.sks.string_to_param.*"] = torch.randn(2, 8)  # a non-LoRA tensor
    return sd


def factors(sd, name):
    return sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]


def effective_delta(sd, name):
    """What a consumer adds to the weight: up @ down * alpha / rank."""
    up, down = factors(sd, name)
    alpha = sd[f"{name}.alpha"].item() if f"{name}.alpha" in sd else down.shape[0]
    return dense_delta(up, down) * (alpha / down.shape[0])


def test_fixed_ranks_equal_the_dense_truncation(lora):
    request = ResizeRequest(new_rank=3, new_conv_rank=2)
    result = resize_state_dict(lora, request, save_dtype=torch.float32)
    for target in TARGETS:
        old_up, old_down = factors(lora, target.name)
        new_down = result.state_dict[f"{target.name}.lora_down.weight"]
        rank = 2 if target.is_conv else 3  # 4-D modules, the 1x1 proj_in included, use --new_conv_rank
        assert new_down.shape == (rank, *old_down.shape[1:])
        old_scale = lora[f"{target.name}.alpha"].item() / old_down.shape[0]
        expected = dense_truncation(old_up, old_down, rank) * old_scale
        torch.testing.assert_close(effective_delta(result.state_dict, target.name), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "params"),
    [("sv_ratio", [1.5, 3, 10, 1e5]), ("sv_fro", [0.3, 0.9, 0.999]), ("sv_cumulative", [0.3, 0.9, 0.999])],
)
def test_dynamic_ranks_are_kohyas_and_the_update_is_the_dense_truncation(lora, method, params):
    for param in params:
        request = ResizeRequest(new_rank=7, new_conv_rank=5, dynamic_method=method, dynamic_param=param)
        result = resize_state_dict(lora, request)
        for target, outcome in zip(TARGETS, result.modules):
            old_up, old_down = factors(lora, target.name)
            _, dense_spectrum, _ = dense_svd(old_up, old_down)
            kohya = kohya_rank(dense_spectrum, method, param, 5 if target.is_conv else 7)
            rank = min(kohya, old_down.shape[0], len(dense_spectrum))  # never above the update's own rank
            assert (outcome.module.name, outcome.choice.rank, outcome.choice.kohya_rank) == (target.name, rank, kohya)
            old_scale = lora[f"{target.name}.alpha"].item() / old_down.shape[0]
            expected = dense_truncation(old_up, old_down, rank) * old_scale
            torch.testing.assert_close(effective_delta(result.state_dict, target.name), expected, rtol=1e-4, atol=1e-7)


def test_modules_that_keep_their_rank_are_copied_bit_for_bit(lora):
    result = resize_state_dict(lora, ResizeRequest(new_rank=64, dynamic_method="sv_ratio", dynamic_param=1e9))
    kept = [m for m in result.modules if m.copied]
    assert [m.module.name for m in kept] == [t.name for t in TARGETS if t.name != TARGETS[3].name]
    assert all(m.choice.capped_at_input for m in kept)  # kohya would have added a zero singular value
    for m in kept:
        for key in (f"{m.module.name}.lora_up.weight", f"{m.module.name}.lora_down.weight"):
            assert torch.equal(result.state_dict[key], lora[key])
    assert torch.equal(result.state_dict["bundle_emb.sks.string_to_param.*"], lora["bundle_emb.sks.string_to_param.*"])
    assert list(result.state_dict) == list(lora)  # file order kept


def test_rank_above_the_layer_width_is_reduced_losslessly(lora):
    # time_emb_proj: rank 8 on a 6 x 20 layer. kohya's reshape to rank 8 fails there; its true rank is 6.
    name = TARGETS[3].name
    result = resize_state_dict(lora, ResizeRequest(new_rank=8))
    assert result.state_dict[f"{name}.lora_down.weight"].shape == (6, 20)
    torch.testing.assert_close(
        effective_delta(result.state_dict, name), effective_delta(lora, name), rtol=1e-5, atol=1e-8
    )


def test_save_dtype_and_input_untouched(lora):
    before = {k: v.clone() for k, v in lora.items()}
    result = resize_state_dict(lora, ResizeRequest(new_rank=2), save_dtype=torch.float16)
    assert {v.dtype for v in result.state_dict.values()} == {torch.float16}
    assert all(torch.equal(before[k], lora[k]) for k in lora) and lora.keys() == before.keys()


def test_alphaless_peft_module_keeps_scale_one():
    g = torch.Generator().manual_seed(0)
    sd = {"m.lora_A.weight": torch.randn(5, 9, generator=g), "m.lora_B.weight": torch.randn(7, 5, generator=g)}
    result = resize_state_dict(sd, ResizeRequest(new_rank=2))
    assert set(result.state_dict) == set(sd)  # no alpha invented: consumers read none as scale 1
    new = result.state_dict
    expected = dense_truncation(sd["m.lora_B.weight"], sd["m.lora_A.weight"], 2)
    torch.testing.assert_close(
        dense_delta(new["m.lora_B.weight"], new["m.lora_A.weight"]), expected, rtol=1e-4, atol=1e-7
    )


def test_tucker_locon_becomes_a_plain_locon():
    g = torch.Generator().manual_seed(0)
    down, mid, up = (
        torch.randn(4, 6, 1, 1, generator=g),
        torch.randn(4, 4, 3, 3, generator=g),
        torch.randn(5, 4, 1, 1, generator=g),
    )
    sd = {"t.lora_down.weight": down, "t.lora_mid.weight": mid, "t.lora_up.weight": up, "t.alpha": torch.tensor(2.0)}
    result = resize_state_dict(sd, ResizeRequest(new_rank=4))
    assert set(result.state_dict) == {"t.lora_down.weight", "t.lora_up.weight", "t.alpha"}
    assert result.state_dict["t.lora_down.weight"].shape == (4, 6, 3, 3)
    # dense Tucker update: sum over a, b of up[o, a] mid[a, b, h, w] down[b, c]
    tucker = torch.einsum("oa,abhw,bc->ochw", up[:, :, 0, 0].double(), mid.double(), down[:, :, 0, 0].double())
    torch.testing.assert_close(
        effective_delta(result.state_dict, "t"), tucker.reshape(5, -1) * 0.5, rtol=1e-5, atol=1e-9
    )


def test_zero_module_gets_rank_one_like_kohya(lora):
    name = TARGETS[0].name
    lora[f"{name}.lora_up.weight"].zero_()
    result = resize_state_dict(lora, ResizeRequest(new_rank=4, dynamic_method="sv_fro", dynamic_param=0.9))
    assert result.state_dict[f"{name}.lora_down.weight"].shape[0] == 1
    assert not result.state_dict[f"{name}.lora_up.weight"].any()
    assert result.state_dict[f"{name}.alpha"].item() == pytest.approx(4 / 8)


def test_non_finite_weights_are_refused_and_threads_restored(lora):
    threads = torch.get_num_threads()
    lora[f"{TARGETS[1].name}.lora_down.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(LoRAFileError, match=f"x.safetensors: module '{TARGETS[1].name}' has NaN"):
        resize_state_dict(lora, ResizeRequest(new_rank=2), source="x.safetensors")
    assert torch.get_num_threads() == threads  # modules ran one thread each, side by side


def test_metadata_like_kohya(lora):
    metadata = {
        "ss_training_comment": "trained",
        "ss_network_dim": "8",
        "sshs_model_hash": "old",
        "modelspec.title": "t",
    }
    fixed = ResizeRequest(new_rank=3, new_conv_rank=2)
    updated = resized_metadata(metadata, fixed, 8, linear_alpha(resize_state_dict(lora, fixed).modules))
    assert updated == {
        "ss_training_comment": "dimension is resized from 8 to 3 (conv: 2); trained",
        "ss_network_dim": "3",
        "ss_network_alpha": "1.5",  # alpha 4 / rank 8 * new rank 3: the linear modules' alpha
        "modelspec.title": "t",
    }
    dynamic = ResizeRequest(new_rank=3, dynamic_method="sv_fro", dynamic_param=0.9)
    updated = resized_metadata({}, dynamic, 8, None)
    assert updated["ss_training_comment"] == "Dynamic resize with sv_fro: 0.9 from 8; "
    assert (updated["ss_network_dim"], updated["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert resized_metadata({}, ResizeRequest(new_rank=3), 8, None)["ss_network_alpha"] == "3.0"  # no alphas: scale 1


def test_no_op_detection(lora):
    assert is_no_op(lora, ResizeRequest(new_rank=8))
    # proj_in is a 1x1 conv of rank 8: kohya resizes every 4-D module with --new_conv_rank
    assert not is_no_op(lora, ResizeRequest(new_rank=8, new_conv_rank=7))
    assert not is_no_op(lora, ResizeRequest(new_rank=64, dynamic_method="sv_ratio", dynamic_param=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dynamic_method="sv_ratio"), "needs --dynamic_param"),
        (dict(dynamic_method="sv_knee", dynamic_param=2), "--dynamic_method must be one of"),
        (dict(dynamic_method="sv_fro", dynamic_param=-1), "must be positive"),
        (dict(new_rank=0), "at least 1"),
    ],
)
def test_bad_requests(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ResizeRequest(**kwargs)
