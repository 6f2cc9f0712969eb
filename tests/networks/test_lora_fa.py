"""networks.lora_fa against kohya's names and init, its frozen lora_down, and LoRA consumers of its files."""

import json

import pytest
import torch
from torch import nn

from library.training.network_protocol import TrainableNetwork
from networks import lora, lora_fa
from networks.lora_file import load_lora_file
from networks.network_args import NetworkArgsError
from tests.kohya_reference import kohya_module_names
from tests.networks.helpers import assert_lora_consumers_compute_as_we_do, fresh, perturb
from tests.networks.tolerances import assert_close

CONV_ARGS = {"conv_dim": "3", "conv_alpha": "1.5"}


def downs(network):
    return {k: v.clone() for k, v in network.state_dict().items() if k.endswith("lora_down.weight")}


# ---- names, shapes, init, args ----


@pytest.mark.parametrize("model", ["sd15", "sd21"])
@pytest.mark.parametrize("network_args", [{}, CONV_ARGS], ids=["lora", "conv"])
def test_keys_follow_kohyas_naming_and_shapes_are_loras(full_size, model, network_args):
    state = lora_fa.create_network(1.0, 4, 2, None, *full_size[model], **network_args).state_dict()
    assert {key.partition(".")[0] for key in state} == kohya_module_names(*full_size[model], bool(network_args))
    as_lora = lora.create_network(1.0, 4, 2, None, *full_size[model], **network_args).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in as_lora.items()}


def test_block_dims_follow_loras_rules(full_size):
    dims = ",".join(str(1 + i % 4) for i in range(25))
    fa = lora_fa.create_network(1.0, 4, 1, None, *full_size["sd15"], block_dims=dims, down_lr_weight="1,0")
    as_lora = lora.create_network(1.0, 4, 1, None, *full_size["sd15"], block_dims=dims, down_lr_weight="1,0")
    assert [(m.lora_name, m.lora_dim) for m in fa.adapters] == [(m.lora_name, m.lora_dim) for m in as_lora.adapters]


@pytest.mark.parametrize("layer", [nn.Linear(640, 320), nn.Conv2d(320, 640, 3, padding=1)], ids=["linear", "conv"])
def test_down_is_kohyas_frozen_normal_and_up_starts_at_zero(layer):
    module = lora_fa.LoRAFAModule("lora_unet_x", layer, 16, 1.0)
    down = module.lora_down.weight
    std = (2.0 / (layer.weight.shape[1] + 16)) ** 0.5  # kohya: input channels + rank, also for convs
    assert abs(down.std().item() / std - 1) < 0.05 and abs(down.mean().item()) < 0.05 * std
    assert torch.count_nonzero(module.lora_up.weight) == 0
    assert [name for name, _ in module.named_parameters()] == ["lora_up.weight"]
    assert list(module.state_dict()) == ["alpha", "lora_down.weight", "lora_up.weight"]


def test_loraplus_and_misspelt_args_are_refused():
    with pytest.raises(NetworkArgsError, match="loraplus_lr_ratio: LoRA-FA trains only lora_up"):
        lora_fa.create_network(1.0, 4, 1, None, None, None, loraplus_lr_ratio="4")
    with pytest.raises(NetworkArgsError, match="conv_dimm.*valid keys: .*conv_dim"):
        lora_fa.create_network(1.0, 4, 1, None, None, None, conv_dimm="4")


def test_metadata_names_the_module_and_its_args(sd1):
    network = lora_fa.create_network(1.0, 8, 4, None, *fresh(sd1), conv_dim="4", rank_dropout="0.1")
    metadata = network.network_metadata()
    assert (metadata["ss_network_module"], metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (
        "networks.lora_fa",
        "8",
        "4.0",
    )
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0", "rank_dropout": "0.1"}
    assert isinstance(network, TrainableNetwork)


# ---- training ----


def test_kohyas_training_call_sequence_trains_only_lora_up(sd1):
    text_encoder, unet = fresh(sd1)
    network = lora_fa.create_network(1.0, 4, 1, None, text_encoder, unet, conv_dim="2", dropout=None)
    network.apply_to(text_encoder, unet, True, True)
    frozen = downs(network)
    params, names = network.prepare_optimizer_params(5e-5, 1e-4, 1e-4)
    assert names == ["textencoder", "unet"]
    ups = {id(m.lora_up.weight) for m in network.adapters}
    trainable = {id(p) for p in network.get_trainable_params()}
    assert {id(p) for group in params for p in group["params"]} == ups == trainable
    optimizer = torch.optim.AdamW(params, weight_decay=0.1)
    network.prepare_grad_etc(text_encoder, unet)
    network.on_epoch_start(text_encoder, unet)
    for _ in range(2):
        network.on_step_start(text_encoder, unet)
        ids, latents = torch.randint(0, 100, (1, 77)), torch.randn(1, 4, 8, 8)
        unet(latents, torch.tensor([500]), text_encoder(ids)[0]).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        network.apply_max_norm_regularization(1e-3, "cpu")  # scales most modules
    assert all(not m.lora_down.weight.requires_grad for m in network.adapters)
    assert all(torch.equal(value, frozen[key]) for key, value in downs(network).items())
    assert all(torch.count_nonzero(m.lora_up.weight) > 0 for m in network.adapters)


def test_max_norm_scales_only_up_to_kohyas_delta(sd1):
    network = perturb(lora_fa.create_network(1.0, 4, 2, None, *fresh(sd1), conv_dim="3"))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    limit, expected_deltas = 0.05, {}
    for key in [k for k in state if k.endswith("lora_down.weight")]:  # kohya's algorithm on the deltas
        name = key.removesuffix(".lora_down.weight")
        delta = (state[f"{name}.lora_up.weight"].flatten(1) @ state[key].flatten(1)) * state[f"{name}.alpha"] / 4
        norm = delta.norm().clamp(min=limit / 2)
        expected_deltas[name] = delta * norm.clamp(max=limit) / norm
    scaled, _, largest = network.apply_max_norm_regularization(limit, "cpu")
    assert scaled > 0 and largest == pytest.approx(limit, rel=1e-5)
    for module in network.adapters:
        assert torch.equal(module.lora_down.weight, state[f"{module.lora_name}.lora_down.weight"])
        assert_close(module.delta_weight().flatten(1), expected_deltas[module.lora_name])


# ---- files ----


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_and_networks_lora_read_the_file_as_we_compute(pipelines, tmp_path, name):
    models = [fresh(pipelines[name]) for _ in range(3)]
    network = perturb(lora_fa.create_network(1.0, 4, 2.0, None, *models[0], **CONV_ARGS).to(torch.float64))
    assert_lora_consumers_compute_as_we_do(network, models, pipelines[name], tmp_path)


def test_resuming_restores_the_frozen_down_bit_exactly(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    path = tmp_path / "fa.safetensors"
    network = perturb(lora_fa.create_network(1.0, 4, 1, None, text_encoder, unet, conv_dim="2"))
    network.save_weights(path, None, {"ss_output_name": "fa"})
    tensors, written = load_lora_file(path)
    rebuilt, _ = lora_fa.create_network_from_weights(1.0, path, None, text_encoder, unet)  # --dim_from_weights
    torch.manual_seed(99)  # another frozen draw
    resumed = lora_fa.create_network(1.0, 4, 1, None, text_encoder, unet, conv_dim="2")  # --network_weights
    for i, again in enumerate((rebuilt, resumed)):
        assert isinstance(again, lora_fa.LoRAFANetwork) and again.args.conv_dim == 2
        again.load_weights(path)
        again.save_weights(tmp_path / f"{i}.safetensors", None, {"ss_output_name": "fa"})
        tensors_again, written_again = load_lora_file(tmp_path / f"{i}.safetensors")
        assert written_again == written
        assert all(torch.equal(tensors_again[k], v) for k, v in tensors.items())
    inference, _ = lora_fa.create_network_from_weights(1.0, path, None, text_encoder, unet, for_inference=True)
    assert inference.module_name == "networks.lora"  # a LoRA-FA file is a LoRA file
