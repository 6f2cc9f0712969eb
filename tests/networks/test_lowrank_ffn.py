"""networks.lowrank_ffn against kohya's block names, diffusers' FeedForward and the original FFNs it replaces."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from accelerate.state import AcceleratorState
from diffusers import UNet2DConditionModel
from diffusers.models.attention import FeedForward

import train_network
from library.models.sd_configs import SD15_UNET, SD21_UNET
from library.models.stable_diffusion import load_stable_diffusion
from library.training.network_protocol import TrainableNetwork
from networks import lora, lowrank_ffn
from networks.base import NetworkStateError, NetworkWeightsError
from networks.lora_file import load_lora_file
from networks.network_args import NetworkArgsError, NetworkError
from tests.networks.tolerances import assert_close

ARTICLE_BLOCKS = "IN7,IN8,MID,OUT3,OUT4,OUT5"
# kohya's block index rule written out for SD1/2 (down i, j -> IN 1+3i+j; up i, j -> OUT 3i+j).
FFN_BLOCKS = {
    "IN01": "down_blocks.0.attentions.0", "IN02": "down_blocks.0.attentions.1",
    "IN04": "down_blocks.1.attentions.0", "IN05": "down_blocks.1.attentions.1",
    "IN07": "down_blocks.2.attentions.0", "IN08": "down_blocks.2.attentions.1",
    "MID": "mid_block.attentions.0",
    "OUT03": "up_blocks.1.attentions.0", "OUT04": "up_blocks.1.attentions.1", "OUT05": "up_blocks.1.attentions.2",
    "OUT06": "up_blocks.2.attentions.0", "OUT07": "up_blocks.2.attentions.1", "OUT08": "up_blocks.2.attentions.2",
    "OUT09": "up_blocks.3.attentions.0", "OUT10": "up_blocks.3.attentions.1", "OUT11": "up_blocks.3.attentions.2",
}  # fmt: skip


def kohya_name(path: str) -> str:
    return "lora_unet_" + f"{path}.transformer_blocks.0.ff".replace(".", "_")


@pytest.fixture(scope="module")
def full_size():
    """SD1.5 and SD2.1 UNets on the meta device: names and shapes without memory."""
    with init_empty_weights():
        return {"sd15": UNet2DConditionModel(**SD15_UNET), "sd21": UNet2DConditionModel(**SD21_UNET)}


@pytest.fixture(scope="module")
def sd1(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir)


def unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), context).sample


def perturb(network, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return network


# ---- targets, names, widths ----


@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_targets_are_the_16_ffns_with_kohya_names_and_blocks(full_size, model):
    network = lowrank_ffn.create_network(1.0, None, None, None, None, full_size[model], ratio="0.5")
    assert set(network.widths) == {kohya_name(path) for path in FFN_BLOCKS.values()}
    by_block = {lowrank_ffn.block_name(t.block) for t in lowrank_ffn.ffn_targets(full_size[model])}
    assert by_block == set(FFN_BLOCKS)


def test_article_blocks_give_the_1280_channel_ffns_at_width_960(full_size):
    unet = full_size["sd15"]
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=ARTICLE_BLOCKS, hidden="960")
    expected = {kohya_name(FFN_BLOCKS[b]) for b in ("IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05")}
    assert network.widths == dict.fromkeys(expected, 960)
    c, k = 1280, 960
    assert sum(p.numel() for p in network.parameters()) == 6 * (c * 2 * k + 2 * k + k * c + c)
    assert network.network_metadata()["ss_network_dim"] == "960"


def test_ratio_scales_with_the_stage_and_network_dim_is_the_fallback(full_size):
    by_ratio = lowrank_ffn.create_network(1.0, None, None, None, None, full_size["sd15"], ratio="0.1875").widths
    assert by_ratio[kohya_name(FFN_BLOCKS["IN01"])] == 240 and by_ratio[kohya_name(FFN_BLOCKS["MID"])] == 960
    by_dim = lowrank_ffn.create_network(1.0, 128, None, None, None, full_size["sd15"], blocks="OUT11,IN1")
    assert by_dim.widths == {kohya_name(FFN_BLOCKS["IN01"]): 128, kohya_name(FFN_BLOCKS["OUT11"]): 128}
    assert json.loads(by_dim.network_metadata()["ss_network_args"]) == {"blocks": "IN01,OUT11"}


@pytest.mark.parametrize(
    "network_args, message",
    [
        ({"blocks": "IN3", "ratio": "0.5"}, "IN03 has no transformer feed-forward; blocks with one: IN01,IN02,IN04"),
        ({"blocks": "IN12", "ratio": "0.5"}, "'IN12' is not a block name"),
        ({"blocks": "IN7;IN8", "ratio": "0.5"}, "is not a block name"),
        ({"hidden": "960", "ratio": "0.5"}, "hidden and ratio both set"),
        ({"ratio": "1.5"}, "ratio=1.5: must be in (0, 1]"),
        (
            {"hidden": "2000"},
            "hidden=2000: lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff has only 1280",
        ),
        ({}, "give the narrow width"),
        ({"rank": "4", "ratio": "0.5"}, "unknown network_args rank"),
    ],
)
def test_bad_network_args_are_named(full_size, network_args, message):
    with pytest.raises(NetworkArgsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lowrank_ffn.create_network(1.0, None, None, None, None, full_size["sd15"], **network_args)


def test_network_dropout_is_refused(full_size):
    with pytest.raises(NetworkArgsError, match="--network_dropout"):
        lowrank_ffn.create_network(1.0, None, None, None, None, full_size["sd15"], neuron_dropout=0.1, ratio="0.5")


def test_only_geglu_feed_forwards_can_be_narrowed():
    with pytest.raises(NetworkError, match="only GEGLU feed-forwards"):
        lowrank_ffn.NarrowFFNModule("lora_unet_x_ff", FeedForward(8, activation_fn="gelu"), 4)


# ---- the math ----


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_full_width_reproduces_the_original_unet(tiny_sd, name):
    unet = load_stable_diffusion(getattr(tiny_sd, f"{name}_dir")).unet
    expected = unet_output(unet)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio="1")
    network.apply_to(None, unet)
    assert_close(unet_output(unet), expected)
    assert all(m.hidden_width == m.full_width for m in network.ffn_modules)


def test_narrow_module_computes_diffusers_feed_forward_of_its_width(sd1):
    unet = copy.deepcopy(sd1.unet)
    network = perturb(lowrank_ffn.create_network(1.0, None, None, None, None, unet, hidden="40", blocks="IN4"))
    module = network.ffn_modules[0]
    reference = FeedForward(64, inner_dim=40)
    reference.net.load_state_dict(module.net.state_dict())
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert_close(module.narrow(x), reference(x))


def test_kept_units_are_the_top_weight_scores_and_drop_exactly_the_others(sd1):
    unet = copy.deepcopy(sd1.unet)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, hidden="100", blocks="OUT3")
    module, ff = network.ffn_modules[0], network.ffn_modules[0].original
    proj, out = ff.net[0].proj, ff.net[2]
    value, gate = proj.weight.split(256)
    scores = value.norm(dim=1) * gate.norm(dim=1) * out.weight.norm(dim=0)
    kept = torch.zeros(256, dtype=torch.bool)
    kept[scores.argsort(descending=True)[:100]] = True
    x = torch.randn(5, 64)
    with torch.no_grad():
        hidden_value, hidden_gate = F.linear(x, proj.weight, proj.bias).split(256, dim=-1)
        masked = hidden_value * F.gelu(hidden_gate) * kept  # the original FFN with the other units zeroed
        assert_close(module.narrow(x), F.linear(masked, out.weight, out.bias))


def test_multiplier_blends_and_the_theseus_flag_picks_the_original(sd1):
    unet = copy.deepcopy(sd1.unet)
    network = perturb(lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio="0.25", blocks="MID"))
    module = network.ffn_modules[0]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        original, narrow = module.original(x), module.narrow(x)
        network.apply_to(None, unet)
        assert_close(module.original(x), narrow)
        module.use_successor = False
        assert_close(module.original(x), original)
        module.use_successor = True
        network.set_multiplier(0.25)
        assert_close(module.original(x), 0.75 * original + 0.25 * narrow)
        network.set_multiplier(0.0)
        assert_close(module.original(x), original)


def test_float32_network_runs_on_a_bfloat16_unet(sd1):
    unet = copy.deepcopy(sd1.unet).to(torch.bfloat16)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio="1")
    assert {p.dtype for p in network.parameters()} == {torch.float32}
    network.apply_to(None, unet)
    module = network.ffn_modules[0]
    x = torch.randn(2, 3, module.original.net[0].proj.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(module.original(x), module.reference(x))


# ---- files ----


def test_file_holds_feed_forward_tensors_under_kohya_names_and_reloads(sd1, tmp_path):
    unet = copy.deepcopy(sd1.unet)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=ARTICLE_BLOCKS, ratio="0.25")
    perturb(network)
    path = tmp_path / "ffn.safetensors"
    network.save_weights(path, None, {"ss_output_name": "ffn"})
    tensors, metadata = load_lora_file(path)
    names = {kohya_name(FFN_BLOCKS[b]) for b in ("IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05")}
    assert set(tensors) == {f"{n}.{t}" for n in names for t in lowrank_ffn.FFN_TENSORS}
    assert tensors[f"{kohya_name(FFN_BLOCKS['MID'])}.net.0.proj.weight"].shape == (2 * 64, 64)
    assert json.loads(metadata["lowrank_ffn_widths"]) == dict.fromkeys(names, 64)
    assert metadata["lowrank_ffn_init"] == "weights" and metadata["ss_network_module"] == "networks.lowrank_ffn"
    network.apply_to(None, unet)
    expected = unet_output(unet)

    fresh = copy.deepcopy(sd1.unet)
    rebuilt, weights = lowrank_ffn.create_network_from_weights(1.0, path, None, None, fresh)
    rebuilt.apply_to(None, fresh)
    rebuilt.load_weights(path)
    assert rebuilt.widths == network.widths
    assert json.loads(rebuilt.network_metadata()["ss_network_args"]) == {
        "blocks": "IN07,IN08,MID,OUT03,OUT04,OUT05",
        "hidden": "64",
    }
    assert_close(unet_output(fresh), expected)


def test_init_method_travels_with_the_weights(sd1, tmp_path):
    unet = copy.deepcopy(sd1.unet)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio="0.5", blocks="MID")
    network.init_method = "pca"
    network.save_weights(tmp_path / "a.safetensors", None, {})
    again = lowrank_ffn.create_network(1.0, None, None, None, None, unet, ratio="0.5", blocks="MID")
    again.load_weights(tmp_path / "a.safetensors")
    from_file, _ = lowrank_ffn.create_network_from_weights(1.0, tmp_path / "a.safetensors", None, None, unet)
    assert again.init_method == from_file.init_method == "pca"


def test_lora_files_and_foreign_unets_are_refused(sd1, full_size):
    lora_weights = lora.create_network(1.0, 4, 1, None, None, copy.deepcopy(sd1.unet)).state_dict()
    with pytest.raises(NetworkWeightsError, match="is not a narrow-FFN tensor.*is it a LoRA file"):
        lowrank_ffn.create_network_from_weights(1.0, None, None, None, sd1.unet, weights_sd=lora_weights)
    bigger = lowrank_ffn.create_network(1.0, None, None, None, None, full_size["sd15"], ratio="0.5").state_dict()
    renamed = {k.replace("down_blocks_0", "down_blocks_7"): v for k, v in bigger.items()}
    with pytest.raises(NetworkWeightsError, match="match no FFN of this UNet, e.g. 'lora_unet_down_blocks_7"):
        lowrank_ffn.create_network_from_weights(1.0, None, None, None, sd1.unet, weights_sd=renamed)


def test_merging_and_max_norm_are_refused(sd1):
    network = lowrank_ffn.create_network(1.0, None, None, None, None, copy.deepcopy(sd1.unet), ratio="0.5")
    assert isinstance(network, TrainableNetwork) and not network.is_mergeable()
    with pytest.raises(NetworkStateError, match="merge_to needs delta weights"):
        network.merge_to(None, None)
    with pytest.raises(NetworkStateError, match="--scale_weight_norms needs delta weights"):
        network.apply_max_norm_regularization(1.0)


# ---- train_network.py ----


@pytest.fixture
def fresh_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_network_trains_only_the_narrow_ffns(tiny_sd, tmp_path, fresh_accelerate):
    shutil.copytree(tiny_sd.train_data_dir, tmp_path / "img")
    train_network.main([
        "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir), "--train_data_dir", str(tmp_path / "img"),
        "--output_dir", str(tmp_path / "out"), "--output_name", "ffn", "--resolution", "64",
        "--caption_extension", ".txt", "--network_module", "networks.lowrank_ffn",
        "--network_args", f"blocks={ARTICLE_BLOCKS}", "ratio=0.25", "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW", "--max_train_steps", "3", "--seed", "1", "--max_data_loader_n_workers", "0",
    ])  # fmt: skip
    tensors, metadata = load_lora_file(tmp_path / "out" / "ffn.safetensors")
    unet = load_stable_diffusion(tiny_sd.sd1_dir).unet
    start = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=ARTICLE_BLOCKS, ratio="0.25")
    assert set(tensors) == set(start.state_dict())
    assert any(not torch.equal(tensors[k], v) for k, v in start.state_dict().items())
    assert json.loads(metadata["ss_network_args"]) == {"blocks": "IN07,IN08,MID,OUT03,OUT04,OUT05", "ratio": "0.25"}
    assert metadata["ss_steps"] == "3" and "lowrank_ffn_widths" in metadata
