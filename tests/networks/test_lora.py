"""networks.lora against kohya's names and counts, diffusers' loader, and the math of each layer type."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from library.training.network_protocol import TrainableNetwork, as_trainable_network
from networks import lora
from networks.base import NetworkStateError, NetworkWeightsError, block_index
from networks.lora_file import load_lora_file, save_lora_file
from networks.network_args import NetworkArgsError
from tests.networks.helpers import assert_outputs_close, fresh, load_with_diffusers, outputs, perturb
from tests.networks.tolerances import assert_close

CONV_ARGS = {"conv_dim": "3", "conv_alpha": "1.5"}


# ---- names and counts ----


@pytest.mark.parametrize(
    "model, network_args, te_count, unet_count",
    [("sd15", {}, 72, 192), ("sd15", CONV_ARGS, 72, 278), ("sd21", {}, 138, 192), ("sd21", CONV_ARGS, 138, 278)],
)
def test_module_counts_match_kohya(full_size, model, network_args, te_count, unet_count):
    network = lora.create_network(1.0, 4, 1, None, *full_size[model], **network_args)
    assert (len(network.text_encoder_loras), len(network.unet_loras)) == (te_count, unet_count)
    assert len(network.state_dict()) == 3 * (te_count + unet_count)


def test_keys_and_shapes_are_kohyas(full_size):
    state = lora.create_network(1.0, 8, 4, None, *full_size["sd15"], **CONV_ARGS).state_dict()
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
    expected = [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    expected += ["lora_te_text_model_encoder_layers_11_mlp_fc1", "lora_te_text_model_encoder_layers_11_mlp_fc2"]
    expected += [f"{block}attn{i}_to_{p}" for i in (1, 2) for p in ("q", "k", "v", "out_0")]
    expected += [f"{block}ff_net_0_proj", f"{block}ff_net_2", "lora_unet_mid_block_attentions_0_proj_out"]
    expected += ["lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"]
    expected += ["lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_2_upsamplers_0_conv"]
    expected += ["lora_unet_mid_block_resnets_1_time_emb_proj", "lora_unet_up_blocks_3_attentions_2_proj_in"]
    names = {key.partition(".")[0] for key in state}
    assert set(expected) <= names
    assert {key.partition(".")[2] for key in state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (8, 320, 1, 1),  # SD1: 1x1 conv
        f"{block}attn2_to_k.lora_down.weight": (8, 768),
        f"{block}attn2_to_k.lora_up.weight": (320, 8),
        "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight": (3, 320, 3, 3),  # conv_dim
        "lora_unet_down_blocks_0_downsamplers_0_conv.lora_up.weight": (320, 3, 1, 1),
        "lora_unet_mid_block_resnets_1_time_emb_proj.lora_down.weight": (8, 1280),  # network_dim
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight": (8, 320, 1, 1),
    }
    assert {key: tuple(state[key].shape) for key in shapes} == shapes
    alphas = {state[f"{block}attn1_to_q.alpha"], state["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]}
    assert all(a.dtype == torch.float32 and a.dim() == 0 for a in alphas) and {a.item() for a in alphas} == {4.0, 1.5}


def test_sd2_projections_are_linear(full_size):
    state = lora.create_network(1.0, 8, 4, None, *full_size["sd21"]).state_dict()
    assert state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (8, 320)
    assert state["lora_te_text_model_encoder_layers_22_self_attn_q_proj.lora_down.weight"].shape == (8, 1024)


def test_a_flattened_text_encoder_gets_the_canonical_names(full_size):
    text_encoder, unet = full_size["sd15"]
    nested = lora.create_network(1.0, 4, 1, None, text_encoder, unet).state_dict()
    flat = lora.create_network(1.0, 4, 1, None, text_encoder.text_model, unet).state_dict()  # no text_model level
    in_list = lora.create_network(1.0, 4, 1, None, [text_encoder], unet).state_dict()  # newer kohya passes lists
    assert list(flat) == list(nested) == list(in_list)


def test_no_state_leaks_from_one_network_to_the_next(full_size):
    lora.create_network(1.0, 4, 1, None, *full_size["sd15"], conv_dim="4")
    plain = lora.create_network(1.0, 4, 1, None, *full_size["sd15"])
    assert len(plain.unet_loras) == 192
    assert not any("resnets" in m.lora_name or "samplers" in m.lora_name for m in plain.unet_loras)
    assert lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE == ("Transformer2DModel",)


def test_network_implements_the_training_protocol(full_size):
    network = lora.create_network(1.0, 4, 1, None, *full_size["sd15"])
    assert isinstance(network, TrainableNetwork)
    assert as_trainable_network(network, "networks.lora", {}) is network


# ---- the math, per layer type ----

LAYERS = {
    "linear": (lambda: nn.Linear(16, 24), (2, 5, 16)),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 6, 6)),
    "conv3x3": (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 6, 6)),
    "downsampler": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1), (2, 8, 7, 7)),
}


def kohya_delta(module):
    """ΔW by kohya's merge formulas (linear: up@down; 1x1: squeezed matmul; 3x3: conv of down by up)."""
    up, down = module.lora_up.weight.float(), module.lora_down.weight.float()
    if down.dim() == 2:
        delta = up @ down
    elif down.shape[2:] == (1, 1):
        delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    else:
        delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return delta * module.alpha / module.lora_dim


def apply_weight(layer, x, weight):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, layer.stride, layer.padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYERS)
def test_output_is_base_plus_delta_and_merges_and_restores(kind, dtype):
    make, shape = LAYERS[kind]
    layer, x = make().to(dtype), torch.randn(shape).to(dtype)
    module = perturb(lora.LoRAModule("lora_unet_x", layer, 4, 2.0)).to(dtype)
    base = layer(x)
    module.apply()
    adapted = layer(x)
    assert_close(module.delta_weight(), kohya_delta(module))
    assert_close(adapted, base + apply_weight(layer, x, kohya_delta(module).to(dtype)))
    assert not torch.allclose(adapted, base)
    module.restore()
    assert torch.equal(layer(x), base)
    module.merge_()
    assert_close(layer(x), adapted)


def test_conv_lora_keeps_the_layers_geometry():
    layer = nn.Conv2d(8, 8, 3, stride=2, padding=1)
    module = lora.LoRAModule("lora_unet_x", layer, 4, 1.0)
    assert (module.lora_down.stride, module.lora_down.padding, module.lora_up.kernel_size) == ((2, 2), (1, 1), (1, 1))


def test_init_makes_a_no_op_with_kaiming_down():
    layer = nn.Linear(64, 32)
    module = lora.LoRAModule("lora_unet_x", layer, 8, 1.0)
    assert torch.count_nonzero(module.lora_up.weight) == 0
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in 64
    assert module.lora_down.weight.abs().max() <= bound and module.lora_down.weight.std() > bound / 3


def test_alpha_scales_and_multiplier_weights_the_delta():
    layer, x = nn.Linear(16, 24), torch.randn(3, 16)
    base = layer(x)
    assert lora.LoRAModule("lora_unet_x", layer, 4, 0).alpha.item() == 4.0  # alpha 0 -> rank: scale 1
    module = perturb(lora.LoRAModule("lora_unet_x", layer, 4, None))  # so does None
    module.apply()
    assert module.alpha.item() == 4.0 and module.alpha.dtype == torch.float32
    delta = F.linear(x, module.lora_up.weight @ module.lora_down.weight)
    module.multiplier = 0.5
    assert_close(layer(x), base + 0.5 * delta)
    module.multiplier = 0.0
    assert torch.equal(layer(x), base)


def test_autocast_runs_in_bfloat16_and_trains_float32_weights():
    for kind in ("linear", "downsampler"):
        make, shape = LAYERS[kind]
        layer, x = make(), torch.randn(shape)
        module = perturb(lora.LoRAModule("lora_unet_x", layer, 4, 1.0))
        expected = layer(x) + apply_weight(layer, x, kohya_delta(module).detach())
        module.apply()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        assert_close(out, expected.to(torch.bfloat16))
        out.float().square().sum().backward()
        assert module.lora_up.weight.grad.dtype == torch.float32 and module.lora_up.weight.grad.abs().sum() > 0


# ---- dropouts ----


def lora_parts(module, x):
    hidden = F.linear(x, module.lora_down.weight)
    return hidden, lambda h: F.linear(h, module.lora_up.weight) * module.scale


@pytest.mark.parametrize("kind", ["neuron", "rank", "module"])
def test_dropouts_follow_kohya_and_only_in_training(kind):
    layer, x = nn.Linear(16, 24), torch.randn(4, 5, 16)
    p = 0.4
    option = "dropout" if kind == "neuron" else f"{kind}_dropout"  # neuron dropout = --network_dropout
    module = perturb(lora.LoRAModule("lora_unet_x", layer, 6, 3.0, **{option: p}))
    base = layer(x)
    module.apply()
    hidden, up = lora_parts(module, x)
    module.eval()
    assert_close(layer(x), base + up(hidden))
    module.train()
    for seed in range(4):
        torch.manual_seed(seed)
        if kind == "neuron":
            expected = base + up(F.dropout(hidden, p))
        elif kind == "rank":
            keep = torch.rand(4, 1, 6) > p  # one mask of rank channels per sample
            expected = base + up(hidden * keep) / (1 - p)
        else:
            expected = base if torch.rand(()) < p else base + up(hidden)
        torch.manual_seed(seed)
        assert_close(layer(x), expected)


def test_rank_dropout_masks_conv_channels():
    layer, x = nn.Conv2d(8, 12, 3, padding=1), torch.randn(3, 8, 5, 5)
    module = perturb(lora.LoRAModule("lora_unet_x", layer, 6, 3.0, rank_dropout=0.5))
    base = layer(x)
    module.apply()
    torch.manual_seed(0)
    keep = (torch.rand(3, 6, 1, 1) > 0.5).float()
    hidden = F.conv2d(x, module.lora_down.weight, None, 1, 1) * keep
    expected = base + F.conv2d(hidden, module.lora_up.weight) * module.scale / 0.5
    torch.manual_seed(0)
    assert_close(layer(x), expected)


def test_gradients_are_unchanged_by_the_unets_gradient_checkpointing(sd1):
    unet = copy.deepcopy(sd1.unet)
    network = perturb(lora.create_network(1.0, 4, 1, None, None, unet, neuron_dropout=0.2, rank_dropout="0.2"))
    network.apply_to(None, unet)
    unet.train()
    network.train()
    latents, hidden = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 64)

    def gradients():
        torch.manual_seed(3)
        unet(latents, torch.tensor([500]), hidden).sample.square().mean().backward()
        grads = [p.grad.clone() for p in network.parameters()]
        network.zero_grad()
        return grads

    plain = gradients()
    unet.enable_gradient_checkpointing()
    for a, b in zip(gradients(), plain):
        assert_close(a, b)
    assert sum(bool(g.any()) for g in plain) > 0.9 * len(plain)  # dropouts may zero a few modules entirely


def test_kohyas_training_call_sequence_trains_only_the_network(sd1, tmp_path):
    """The calls train_network.py makes, in its order, for two steps (with its injected dropout=None)."""
    text_encoder, unet = fresh(sd1)
    base = [{k: v.clone() for k, v in model.state_dict().items()} for model in (text_encoder, unet)]
    network = lora.create_network(1.0, 4, 1, None, text_encoder, unet, neuron_dropout=None, dropout=None)
    network.apply_to(text_encoder, unet, True, True)
    network.enable_gradient_checkpointing()
    params, _ = network.prepare_optimizer_params(5e-5, 1e-4, 1e-4)
    accelerator = Accelerator(cpu=True)
    network, optimizer = accelerator.prepare(network, torch.optim.AdamW(params, weight_decay=0.0))
    network.prepare_grad_etc(text_encoder, unet)
    network.on_epoch_start(text_encoder, unet)
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    for _ in range(2):
        network.on_step_start(text_encoder, unet)
        ids, latents = torch.randint(0, 100, (1, 77)), torch.randn(1, 4, 8, 8)
        loss = unet(latents, torch.tensor([500]), text_encoder(ids)[0]).sample.square().mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        network.apply_max_norm_regularization(1.0, "cpu")
    network.save_weights(tmp_path / "trained.safetensors", torch.float16, {"ss_output_name": "trained"})

    for model, state in zip((text_encoder, unet), base):
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    trained = network.state_dict()
    assert all(not torch.equal(trained[k], v) for k, v in initial.items() if k.endswith("lora_up.weight"))
    tensors, metadata = load_lora_file(tmp_path / "trained.safetensors")
    assert all(torch.equal(tensors[k], v.half()) for k, v in trained.items())
    assert metadata["ss_output_name"] == "trained" and metadata["ss_network_dim"] == "4"


# ---- diffusers ----


@pytest.mark.parametrize("network_args", [{}, CONV_ARGS], ids=["lora", "locon"])
@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_reads_the_file_as_our_network_computes_it(pipelines, tmp_path, caplog, name, network_args):
    ours, theirs, merged = (fresh(pipelines[name]) for _ in range(3))
    base = outputs(*ours)
    network = lora.create_network(1.0, 4, 2.0, None, *ours, **network_args)
    perturb(network.to(torch.float64))
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, {})
    network.apply_to(*ours)
    expected = outputs(*ours)
    assert not torch.allclose(expected[0], base[0]) and not torch.allclose(expected[1], base[1])

    with caplog.at_level("WARNING"):
        load_with_diffusers(path, *theirs, pipelines[name])
    assert "unexpected" not in caplog.text.lower() and "not loaded" not in caplog.text.lower()
    assert_outputs_close(outputs(*theirs), expected)

    # --base_weights: kohya's signature, weights merged into the base model
    from_file, weights = lora.create_network_from_weights(1.0, path, None, *merged)
    from_file.to(torch.float64).merge_to(*merged, weights, None, "cpu")
    assert_outputs_close(outputs(*merged), expected)

    network.restore()
    assert all(torch.equal(a, b) for a, b in zip(outputs(*ours), base))


# ---- files, resume, metadata ----


@pytest.mark.parametrize("network_args", [{}, CONV_ARGS], ids=["lora", "locon"])
def test_save_reload_save_is_bit_exact(sd1, tmp_path, network_args):
    text_encoder, unet = fresh(sd1)
    metadata = {"ss_output_name": "toy", "ss_network_dim": "None"}  # kohya writes "None" for a default dim
    first = tmp_path / "first.safetensors"
    network = perturb(lora.create_network(1.0, None, None, None, text_encoder, unet, **network_args))
    network.save_weights(first, torch.float16, metadata)

    rebuilt, _ = lora.create_network_from_weights(1.0, first, None, text_encoder, unet)  # --dim_from_weights
    resumed = lora.create_network(1.0, None, None, None, text_encoder, unet, **network_args)  # --network_weights
    tensors, written = load_lora_file(first)
    for i, again in enumerate((rebuilt, resumed)):
        again.load_weights(first)
        again.save_weights(tmp_path / f"{i}.safetensors", torch.float16, metadata)
        tensors_again, written_again = load_lora_file(tmp_path / f"{i}.safetensors")
        assert written_again == written  # same sshs_model_hash: same data bytes (the header's key order varies)
        assert tensors_again.keys() == tensors.keys()
        assert all(torch.equal(tensors_again[k], v) and tensors_again[k].dtype == v.dtype for k, v in tensors.items())


def test_metadata_describes_the_network_as_built(sd1, tmp_path):
    network = lora.create_network(1.0, None, None, None, *fresh(sd1), neuron_dropout=0.1, conv_dim="2")
    metadata = network.network_metadata()
    assert {k: metadata[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha")} == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "1.0",
    }
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "dropout": "0.1"}
    written = network.save_weights(tmp_path / "x.safetensors", None, {"ss_network_dim": "None"})
    tensors, on_disk = load_lora_file(tmp_path / "x.safetensors")
    assert on_disk == written and on_disk["ss_network_dim"] == "4"
    assert tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 4


def test_dims_and_alphas_come_from_the_file(sd1, tmp_path):
    dims = ",".join(str(2 + i % 3) for i in range(25))
    source = lora.create_network(1.0, 8, 4, None, *fresh(sd1), block_dims=dims, conv_dim="5", conv_alpha="2")
    source.save_weights(tmp_path / "mixed.safetensors", None, None)
    built, _ = lora.create_network_from_weights(1.0, tmp_path / "mixed.safetensors", None, *fresh(sd1))
    assert {m.lora_name: m.lora_dim for m in built.adapters} == {m.lora_name: m.lora_dim for m in source.adapters}
    metadata = built.network_metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("Dynamic", "4.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "5", "conv_alpha": "2.0"}


def test_loading_reports_what_does_not_fit(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    conv_file, rank8_file = tmp_path / "conv.safetensors", tmp_path / "rank8.safetensors"
    lora.create_network(1.0, 4, 1, None, text_encoder, unet, conv_dim="4").save_weights(conv_file, None, None)
    lora.create_network(1.0, 8, 1, None, text_encoder, unet).save_weights(rank8_file, None, None)
    plain = lora.create_network(1.0, 4, 1, None, text_encoder, unet)
    with pytest.raises(NetworkWeightsError, match=r"fit no module.*'lora_unet_\w*(resnets|samplers)\w*\."):
        plain.load_weights(conv_file)
    with pytest.raises(NetworkWeightsError, match=r"'lora_te_\w+\.lora_down\.weight' has shape \(8, 64\).*\(4, 64\)"):
        plain.load_weights(rank8_file)


def test_a_unet_only_file_loads_into_a_full_network_and_back(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    unet_only = perturb(lora.create_network(1.0, 4, 1, None, text_encoder, unet))
    unet_only.apply_to(text_encoder, unet, apply_text_encoder=False)  # --network_train_unet_only
    unet_only.save_weights(tmp_path / "unet.safetensors", None, None)
    unet_only.restore()
    full = lora.create_network(1.0, 4, 1, None, text_encoder, unet)
    result = full.load_weights(tmp_path / "unet.safetensors")
    assert set(result.missing_keys) == {k for k in full.state_dict() if k.startswith("lora_te_")}
    assert all(torch.equal(full.state_dict()[k], v) for k, v in unet_only.state_dict().items())
    # and a full file into a network that trains only the UNet: the text-encoder part is ignored
    full.save_weights(tmp_path / "full.safetensors", None, None)
    unet_only.load_weights(tmp_path / "full.safetensors")


def test_sd2_files_with_1x1_conv_projections_load_into_linear_ones(sd2, tmp_path):
    text_encoder, unet = fresh(sd2)
    network = perturb(lora.create_network(1.0, 4, 1, None, text_encoder, unet))
    # kohya's own SD2 single-file loader keeps proj_in/out as 1x1 convs, so its files hold 4-D tensors there
    as_conv = {k: v[..., None, None] if "_proj_" in k and v.dim() == 2 else v for k, v in network.state_dict().items()}
    assert any(v.dim() == 4 for v in as_conv.values())
    save_lora_file(tmp_path / "conv.safetensors", as_conv)
    rebuilt, _ = lora.create_network_from_weights(1.0, tmp_path / "conv.safetensors", None, text_encoder, unet)
    rebuilt.load_weights(tmp_path / "conv.safetensors")
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in network.state_dict().items())


def test_a_file_without_alpha_means_scale_one(sd1, tmp_path):
    text_encoder, unet = fresh(sd1)
    network = lora.create_network(1.0, 4, 1, None, text_encoder, unet)
    no_alpha = {k: v for k, v in network.state_dict().items() if not k.endswith(".alpha")}
    save_lora_file(tmp_path / "old.safetensors", no_alpha)
    network.load_weights(tmp_path / "old.safetensors")
    built, _ = lora.create_network_from_weights(1.0, tmp_path / "old.safetensors", None, text_encoder, unet)
    assert all(m.scale == 1.0 and m.alpha.item() == 4.0 for m in network.adapters + built.adapters)


@pytest.mark.parametrize(
    "key, message",
    [
        ("lora_unet_mid_block_attentions_0_proj_in.hada_w1_a", "not a kohya LoRA tensor"),
        ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "match no layer of this model"),
    ],
)
def test_foreign_files_are_refused_by_name(sd1, key, message):
    weights = {key: torch.zeros(4, 8), key.replace("down", "up").replace("w1_a", "w1_b"): torch.zeros(8, 4)}
    with pytest.raises(NetworkWeightsError, match=message) as error:
        lora.create_network_from_weights(1.0, None, None, *fresh(sd1), weights_sd=weights)
    assert key.partition(".")[0] in str(error.value)


def test_merging_an_applied_network_is_refused(sd1):
    text_encoder, unet = fresh(sd1)
    network = lora.create_network(1.0, 4, 1, None, text_encoder, unet)
    network.apply_to(text_encoder, unet)
    with pytest.raises(NetworkStateError):
        network.merge_to(text_encoder, unet, None, None, "cpu")


# ---- network_args ----


def test_misspelt_network_arg_is_named():
    with pytest.raises(NetworkArgsError, match="conv_dimm.*valid keys: .*conv_dim"):
        lora.create_network(1.0, 4, 1, None, None, None, conv_dimm="4")


@pytest.mark.parametrize("key", ["block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"])
def test_block_lists_need_25_values(key):
    with pytest.raises(NetworkArgsError, match=f"{key}: 25 values needed.*got 12"):
        lora.create_network(1.0, 4, 1, None, None, None, **{key: ",".join(["4"] * 12)})


def test_dropout_arg_and_network_dropout_are_one_setting():
    assert lora.LoRAArgs(dropout=0.1).with_neuron_dropout(0.1).dropout == 0.1
    assert lora.LoRAArgs().with_neuron_dropout(0.2).dropout == 0.2
    with pytest.raises(NetworkArgsError, match="dropout=0.1 contradicts --network_dropout 0.3"):
        lora.LoRAArgs(dropout=0.1).with_neuron_dropout(0.3)


def test_block_dims_and_alphas_set_each_blocks_rank(full_size):
    dims, conv_dims = [4, 0] + [1 + i for i in range(23)], [30 - i for i in range(25)]  # IN01: rank 0
    alphas, conv_alphas = [0.5 * d for d in dims], [0.25 * d for d in conv_dims]
    network = lora.create_network(
        *(1.0, 4, 1, None, *full_size["sd15"]),
        **{name: ",".join(map(str, values)) for name, values in [("block_dims", dims), ("block_alphas", alphas)]},
        **{"conv_block_dims": ",".join(map(str, conv_dims)), "conv_block_alphas": ",".join(map(str, conv_alphas))},
    )
    in_01 = []
    for module in network.unet_loras:
        block = block_index(module.lora_name)
        three_by_three = module.lora_down.weight.shape[2:] == (3, 3)  # time_emb_proj, conv_shortcut: block_dims
        expected = (conv_dims[block], conv_alphas[block]) if three_by_three else (dims[block], alphas[block])
        assert (module.lora_dim, module.alpha.item()) == expected
        in_01 += [three_by_three] if block == 1 else []
    assert in_01 and all(in_01)  # rank 0 leaves out IN01's linear layers, not its 3x3 convs
    assert all(m.lora_dim == 4 for m in network.text_encoder_loras)


def test_block_alphas_alone_take_effect(full_size):
    alphas = [float(1 + i % 3) for i in range(25)]  # kohya silently ignored these without block_dims
    network = lora.create_network(1.0, 4, 1, None, *full_size["sd15"], block_alphas=",".join(map(str, alphas)))
    assert all(m.alpha.item() == alphas[block_index(m.lora_name)] for m in network.unet_loras)


# ---- optimizer groups ----


def param_ids(modules, prefix=""):
    return {id(p) for m in modules for n, p in m.named_parameters() if n.startswith(prefix)}


def group_ids(group):
    return {id(p) for p in group["params"]}


def test_optimizer_groups_for_text_encoder_and_unet(full_size):
    network = lora.create_network(1.0, 4, 1, None, *full_size["sd15"])
    groups, names = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert names == ["textencoder", "unet"] and [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert group_ids(groups[0]) == param_ids(network.text_encoder_loras)
    assert group_ids(groups[1]) == param_ids(network.unet_loras)
    assert [g["lr"] for g in network.prepare_optimizer_params([2e-5, 9e-5], None, 1e-3)[0]] == [2e-5, 1e-3]
    assert network.prepare_optimizer_params(0, 1e-4, 1e-3)[1] == ["unet"]  # --text_encoder_lr 0 freezes it
    assert network.prepare_optimizer_params(5e-5, 1e-4)[1] == names  # kohya's old two-argument call


def test_block_lr_weights_give_one_group_per_block(full_size):
    weights = [1.0, 0.0, 0.5] + [1.0] * 9 + [2.0] + [i / 11 for i in range(12)]
    network = lora.create_network(
        1.0, 4, 1, None, *full_size["sd15"], down_lr_weight="1,0,0.5", mid_lr_weight="2", up_lr_weight="linear"
    )
    groups, names = network.prepare_optimizer_params(None, 1e-4, None)  # no text-encoder lr: its group is dropped
    blocks = [int(name.removeprefix("unet_block")) for name in names]
    assert 1 not in blocks and not any(block_index(m.lora_name) == 1 for m in network.unet_loras)  # lr 0: no module
    assert set(blocks) == {block_index(m.lora_name) for m in network.unet_loras} - {13}  # OUT00 weight 0 (linear)
    for group, block in zip(groups, blocks):
        assert group["lr"] == pytest.approx(1e-4 * weights[block])
        assert group_ids(group) == param_ids([m for m in network.unet_loras if block_index(m.lora_name) == block])


def test_loraplus_puts_lora_up_in_faster_groups(full_size):
    network = lora.create_network(
        1.0, 4, 1, None, *full_size["sd15"], loraplus_lr_ratio="4", loraplus_text_encoder_lr_ratio="2"
    )
    groups, names = network.prepare_optimizer_params(1e-5, 1e-4, None)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 2e-5, 1e-4, 4e-4])
    assert group_ids(groups[1]) == param_ids(network.text_encoder_loras, "lora_up")
    assert group_ids(groups[2]) == param_ids(network.unet_loras, "lora_down")
    only_unet = lora.create_network(1.0, 4, 1, None, *full_size["sd15"], loraplus_unet_lr_ratio="8")
    groups, names = only_unet.prepare_optimizer_params(1e-5, 1e-4, None)
    assert names == ["textencoder", "unet", "unet plus"] and groups[2]["lr"] == pytest.approx(8e-4)


def test_max_norm_follows_kohyas_state_dict_algorithm(sd1):
    network = perturb(lora.create_network(1.0, 4, 2, None, *fresh(sd1), conv_dim="3"))
    state = {k: v.clone() for k, v in network.state_dict().items()}
    limit, norms, scaled = 0.05, [], 0
    for key in [k for k in state if k.endswith("lora_down.weight")]:  # kohya's algorithm, written out
        name = key.removesuffix(".lora_down.weight")
        up, down, alpha = state[f"{name}.lora_up.weight"], state[key], state[f"{name}.alpha"]
        delta = (up.flatten(1) @ down.flatten(1)) * alpha / down.shape[0]
        norm = delta.norm().clamp(min=limit / 2)
        ratio = norm.clamp(max=limit) / norm
        if ratio != 1:
            scaled += 1
            state[key], state[f"{name}.lora_up.weight"] = down * ratio.sqrt(), up * ratio.sqrt()
        norms.append((delta.norm() * ratio).item())
    result = network.apply_max_norm_regularization(limit, "cpu")
    assert result[0] == scaled > 0
    assert result[1:] == pytest.approx((sum(norms) / len(norms), max(norms)), rel=1e-5)
    for key, value in network.state_dict().items():
        assert_close(value, state[key])
