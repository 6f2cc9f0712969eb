"""networks.dylora against kohya's names, rank sampling and training step, LoRA consumers and the cut script."""

import copy
import json
import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.training.network_protocol import TrainableNetwork
from networks import dylora, lora
from networks.extract_lora_from_dylora import main as extract_main
from networks.lora_file import load_lora_file, sshs_hashes
from networks.network_args import NetworkArgsError
from tests.kohya_reference import kohya_module_names
from tests.networks.helpers import assert_lora_consumers_compute_as_we_do, fresh, perturb
from tests.networks.tolerances import assert_close

LAYERS = {
    "linear": (lambda: nn.Linear(16, 24), (2, 5, 16)),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 6, 6)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 7, 7)),
}


def factors(module):
    """(up, down) as the file holds them, flattened to matrices."""
    state = module.state_dict()
    return state["lora_up.weight"].flatten(1), state["lora_down.weight"].flatten(1)


def stacked_delta(module):
    """``alpha / rank · up @ down`` from the file's factors, as a matrix."""
    up, down = factors(module)
    return up @ down * module.scale


def lora_output(layer, x, up, down, scale):
    """The (unpatched) layer's output plus ``scale · up @ down`` applied as the layer applies its weight."""
    delta = (up @ down).view(layer.weight.shape) * scale
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight + delta, layer.bias)
    return F.conv2d(x, layer.weight + delta, layer.bias, layer.stride, layer.padding)


# ---- names, shapes, args ----


@pytest.mark.parametrize("model", ["sd15", "sd21"])
@pytest.mark.parametrize("convs", [False, True], ids=["lora", "conv"])
def test_keys_follow_kohyas_naming(full_size, model, convs):
    network_args = {"unit": "2", "conv_dim": "4"} if convs else {"unit": "2"}
    state = dylora.create_network(1.0, 4, 2, None, *full_size[model], **network_args).state_dict()
    assert {key.partition(".")[0] for key in state} == kohya_module_names(*full_size[model], convs)
    assert {key.partition(".")[2] for key in state} == {"lora_down.weight", "lora_up.weight", "alpha"}


def test_shapes_are_kohyas(full_size):
    state = dylora.create_network(1.0, 8, 4, None, *full_size["sd15"], conv_dim="6", conv_alpha="3").state_dict()
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (8, 320, 1, 1),  # SD1: 1x1 conv
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 8, 1, 1),
        f"{block}attn2_to_k.lora_down.weight": (8, 768),
        f"{block}attn2_to_k.lora_up.weight": (320, 8),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": (6, 320, 3, 3),  # conv_dim
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": (320, 6, 1, 1),
        "lora_unet_mid_block_resnets_1_time_emb_proj.lora_down.weight": (8, 1280),  # network_dim
    }
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    assert state[f"{block}attn1_to_q.alpha"].item() == 4.0
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 3.0


def test_network_args_are_checked(sd1):
    with pytest.raises(NetworkArgsError, match="units.*valid keys: .*unit"):
        dylora.create_network(1.0, 4, 1, None, None, None, units="2")
    with pytest.raises(NetworkArgsError, match="unit=3 does not divide network_dim 8"):
        dylora.create_network(1.0, 8, 1, None, None, None, unit="3")
    with pytest.raises(NetworkArgsError, match="unit=4 does not divide conv_dim 6"):
        dylora.create_network(1.0, 8, 1, None, None, None, unit="4", conv_dim="6")
    with pytest.raises(NetworkArgsError, match="unit=0: must be at least 1"):
        dylora.create_network(1.0, 8, 1, None, None, None, unit="0")
    with pytest.raises(NetworkArgsError, match=r"unit=2 does not divide the rank 3 of lora_unet_\w+"):
        dylora.create_network(1.0, 8, 1, None, *fresh(sd1), unit="2", block_dims=",".join(["4"] * 12 + ["3"] * 13))


def test_block_dims_and_lr_weights_follow_loras_rules(full_size):
    network_args = {"block_dims": ",".join(str(2 + 2 * (i % 3)) for i in range(25)), "down_lr_weight": "1,0"}
    built = dylora.create_network(1.0, 4, 1, None, *full_size["sd15"], unit="2", **network_args)
    as_lora = lora.create_network(1.0, 4, 1, None, *full_size["sd15"], **network_args)
    assert [(m.lora_name, m.lora_dim) for m in built.adapters] == [(m.lora_name, m.lora_dim) for m in as_lora.adapters]
    assert {m.lora_dim for m in built.unet_loras} == {2, 4, 6}


def test_metadata_names_the_module_and_its_args(sd1):
    network = dylora.create_network(1.0, 8, 4, None, *fresh(sd1), unit="2", conv_dim="4", dropout=None)
    metadata = network.network_metadata()
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "networks.dylora",
        "8",
        "4.0",
    )
    assert json.loads(metadata["ss_network_args"]) == {"unit": "2", "conv_dim": "4", "conv_alpha": "1.0"}
    assert isinstance(network, TrainableNetwork)


# ---- rank sampling and the training step ----


@pytest.mark.parametrize("rank, unit", [(8, 2), (6, 3), (4, 1)])
def test_rank_sampling_is_uniform_over_unit_multiples(rank, unit):
    module = dylora.DyLoRAModule("lora_unet_x", nn.Linear(4, 4), rank, 1.0, unit=unit)
    random.seed(0)
    draws = Counter(module.sample_trainable_rank() for _ in range(3000))
    assert sorted(draws) == list(range(0, rank, unit))
    expected = 3000 * unit / rank
    assert all(abs(count - expected) < 5 * math.sqrt(expected) for count in draws.values())


@pytest.mark.parametrize("kind", LAYERS)
def test_a_training_step_uses_every_rank_and_trains_only_the_sampled_slice(kind):
    make, shape = LAYERS[kind]
    layer, x = make(), torch.randn(shape)
    rank, unit, alpha = 6, 2, 3.0
    module = perturb(dylora.DyLoRAModule("lora_unet_x", layer, rank, alpha, unit=unit))
    up, down = factors(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.apply()
    module.train()
    first = module.sample_trainable_rank()
    # kohya's forward: all ranks, scaled by alpha/r · sqrt(r / (b + unit))
    expected = lora_output(layer, x, up, down, alpha / rank * math.sqrt(rank / (first + unit)))
    out = layer(x)
    assert_close(out, expected.detach())

    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1, weight_decay=0.5)
    out.square().sum().backward()
    trained = {n for n, p in module.named_parameters() if p.grad is not None}
    assert trained == {f"lora_{f}_{i}" for f in "AB" for i in range(first, first + unit)}
    optimizer.step()  # rows without a gradient get neither the update nor the weight decay
    after = module.state_dict()
    rows = set(range(first, first + unit))
    for i in range(rank):
        changed_down = not torch.equal(after["lora_down.weight"][i], before["lora_down.weight"][i])
        changed_up = not torch.equal(after["lora_up.weight"][:, i], before["lora_up.weight"][:, i])
        assert changed_down == changed_up == (i in rows)


@pytest.mark.parametrize("kind", LAYERS)
def test_eval_is_the_plain_lora_the_file_describes(kind):
    make, shape = LAYERS[kind]
    layer, x = make(), torch.randn(shape)
    module = perturb(dylora.DyLoRAModule("lora_unet_x", layer, 4, 2.0, unit=2))
    expected = lora_output(layer, x, *factors(module), 2.0 / 4)
    module.apply()
    module.train()
    module.sample_trainable_rank()
    module.eval()
    assert_close(layer(x), expected.detach())
    assert_close(module.delta_weight(), stacked_delta(module).view(layer.weight.shape))


def test_a_module_trains_without_on_step_start():
    layer = nn.Linear(8, 8)
    module = dylora.DyLoRAModule("lora_unet_x", layer, 4, 1.0)
    module.apply()
    module.train()
    layer(torch.randn(2, 8)).sum().backward()
    assert module.trainable_rank is not None
    assert sum(p.grad is not None for p in module.parameters()) == 2  # one down row, one up column


def test_on_step_start_draws_every_modules_rank_with_pythons_random(sd1):
    network = dylora.create_network(1.0, 8, 1, None, *fresh(sd1), unit="2")
    random.seed(3)
    expected = [r - r % 2 for r in (random.randint(0, 7) for _ in network.adapters)]
    random.seed(3)
    network.on_step_start()
    assert [m.trainable_rank for m in network.adapters] == expected


def test_gradient_checkpointing_recomputes_with_the_steps_rank(sd1):
    unet = copy.deepcopy(sd1.unet)
    network = perturb(dylora.create_network(1.0, 4, 1, None, None, unet, unit="1", conv_dim="4"))
    network.apply_to(None, unet)
    unet.train()
    network.train()
    network.on_step_start()
    latents, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 64)

    def gradients():
        state = random.getstate()
        unet(latents, torch.tensor([500]), hidden).sample.square().mean().backward()
        assert random.getstate() == state  # the forward and its recomputation draw nothing
        grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
        network.zero_grad(set_to_none=True)
        return grads

    plain = gradients()
    unet.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert checkpointed.keys() == plain.keys() and len(plain) == 2 * len(network.adapters)
    for name, grad in plain.items():
        assert_close(checkpointed[name], grad)


def test_loraplus_puts_the_up_columns_in_the_faster_group(sd1):
    network = dylora.create_network(1.0, 4, 1, None, *fresh(sd1), loraplus_lr_ratio="4")
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, None)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    plus = {id(p) for n, p in network.named_parameters() if ".lora_B_" in n}
    assert {id(p) for g in groups[1::2] for p in g["params"]} == plus
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 4e-5, 1e-4, 4e-4])


def test_max_norm_scales_the_stacked_delta_as_kohyas_lora(sd1):
    network = perturb(dylora.create_network(1.0, 4, 2, None, *fresh(sd1), unit="2", conv_dim="2"))
    deltas = {m.lora_name: stacked_delta(m) for m in network.adapters}
    limit = 0.05
    scaled, _, largest = network.apply_max_norm_regularization(limit, "cpu")
    assert scaled > 0 and largest == pytest.approx(limit, rel=1e-5)
    for module in network.adapters:
        delta = deltas[module.lora_name]
        norm = delta.norm().clamp(min=limit / 2)
        assert_close(stacked_delta(module), delta * norm.clamp(max=limit) / norm)


# ---- files ----


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_the_file_is_a_lora_that_diffusers_and_networks_lora_read_as_we_compute(pipelines, tmp_path, name):
    models = [fresh(pipelines[name]) for _ in range(3)]
    network = perturb(dylora.create_network(1.0, 4, 2.0, None, *models[0], unit="2", conv_dim="2").to(torch.float64))
    network.train()
    network.on_step_start()  # a drawn rank changes nothing in eval mode
    assert_lora_consumers_compute_as_we_do(network, models, pipelines[name], tmp_path)


def test_save_reload_save_is_bit_exact(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    first = tmp_path / "first.safetensors"
    network = perturb(dylora.create_network(1.0, 4, 1, None, text_encoder, unet, unit="2", conv_dim="2"))
    network.save_weights(first, torch.float16, {"ss_output_name": "toy"})
    rebuilt, _ = dylora.create_network_from_weights(1.0, first, None, text_encoder, unet, unit="2")
    resumed = dylora.create_network(1.0, 4, 1, None, text_encoder, unet, unit="2", conv_dim="2")
    tensors, written = load_lora_file(first)
    for i, again in enumerate((rebuilt, resumed)):
        assert isinstance(again, dylora.DyLoRANetwork) and all(m.unit == 2 for m in again.adapters)
        again.load_weights(first)
        again.save_weights(tmp_path / f"{i}.safetensors", torch.float16, {"ss_output_name": "toy"})
        tensors_again, written_again = load_lora_file(tmp_path / f"{i}.safetensors")
        assert written_again == written
        assert all(torch.equal(tensors_again[k], v) for k, v in tensors.items())
    with pytest.raises(NetworkArgsError, match="unit=3 does not divide the rank 4"):
        dylora.create_network_from_weights(1.0, first, None, text_encoder, unet, unit="3")


def test_a_partial_file_reports_missing_keys_by_their_file_names(sd1):
    network = dylora.create_network(1.0, 4, 1, None, *fresh(sd1))
    state = {k: v for k, v in network.state_dict().items() if not k.startswith("lora_te_")}
    result = network.load_state_dict(state, strict=False)
    keys = ("lora_down.weight", "lora_up.weight", "alpha")
    expected = {f"{m.lora_name}.{key}" for m in network.text_encoder_loras for key in keys}
    assert set(result.missing_keys) == expected and not result.unexpected_keys


# ---- networks/extract_lora_from_dylora.py ----


def test_extraction_writes_kohyas_cuts_of_the_factors(sd1, tmp_path):
    network = perturb(dylora.create_network(1.0, 8, 4, None, *fresh(sd1), unit="2", conv_dim="2"))
    source = tmp_path / "dy.safetensors"
    network.save_weights(source, None, {"ss_training_comment": "my run"})
    tensors, metadata = load_lora_file(source)
    extract_main(["--model", str(source), "--save_to", str(tmp_path / "cut.safetensors"), "--unit", "2"])
    assert sorted(p.name for p in tmp_path.glob("cut-*")) == [f"cut-{r:04d}.safetensors" for r in (2, 4, 6)]
    for rank in (2, 4, 6):
        cut, cut_metadata = load_lora_file(tmp_path / f"cut-{rank:04d}.safetensors")
        assert cut.keys() == tensors.keys()
        for key, value in tensors.items():
            name = key.partition(".")[0]
            kept = min(rank, tensors[f"{name}.lora_down.weight"].shape[0])  # the rank-2 convs stay whole
            if key.endswith("lora_down.weight"):
                assert torch.equal(cut[key], value[:kept])
            elif key.endswith("lora_up.weight"):
                assert torch.equal(cut[key], value[:, :kept])
            else:
                assert torch.equal(cut[key], value)  # alpha unchanged, as kohya's
        assert cut_metadata["ss_network_dim"] == str(rank)
        assert cut_metadata["ss_training_comment"] == f"split from DyLoRA, rank 8 to {rank}; my run"
        assert cut_metadata["ss_network_module"] == metadata["ss_network_module"] == "networks.dylora"
        assert cut_metadata["sshs_model_hash"] == sshs_hashes(cut, cut_metadata)[0]


@pytest.mark.parametrize("unit, message", [("8", "--unit 8 is not below the rank 8"), ("0", "--unit 0: must be")])
def test_extraction_refuses_a_unit_with_nothing_to_cut(sd1, tmp_path, capsys, unit, message):
    source = tmp_path / "dy.safetensors"
    dylora.create_network(1.0, 8, 4, None, *fresh(sd1)).save_weights(source, None, None)
    with pytest.raises(SystemExit) as exit_info:
        extract_main(["--model", str(source), "--save_to", str(tmp_path / "cut.safetensors"), "--unit", unit])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("cut*"))
