"""Compressed UNet folders: outputs survive saving and loading; stock loaders refuse them; sizes by formula."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from library.distill.cost import count_parameters
from library.errors import CheckpointError, ConfigError
from library.ffn_compression.unet import (
    FFN_WIDTHS_KEY,
    build_compressed_unet,
    compress_unet,
    ffn_widths,
    load_compressed_unet,
)
from library.models.sd_configs import SD15_UNET
from library.models.stable_diffusion import load_stable_diffusion, save_diffusers_folder, save_ldm_checkpoint
from networks import lowrank_ffn
from tests.networks.tolerances import assert_close


def unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 64, generator=generator)
    with torch.no_grad():
        return unet(latents.to(unet.dtype), torch.tensor([20, 800]), context.to(unet.dtype)).sample


@pytest.fixture(scope="module")
def compressed(tiny_sd, tmp_path_factory):
    """The tiny SD1 model with every FFN at a quarter width (perturbed weights), its outputs, and its folder.

    The UNet runs in float64 (tests/networks/tolerances.py: whole random models amplify rounding).
    """
    model = load_stable_diffusion(tiny_sd.sd1_dir)
    model.unet.to(torch.float64)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, model.unet, ratio="0.25")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    network.apply_to(None, model.unet)
    expected = unet_output(model.unet)
    compress_unet(model.unet, network)
    folder = tmp_path_factory.mktemp("compressed") / "model"
    save_diffusers_folder(model, folder)
    return model, expected, folder


def test_compressing_keeps_the_outputs_of_the_applied_network(compressed):
    model, expected, _ = compressed
    assert_close(unet_output(model.unet), expected)
    assert ffn_widths(model.unet)["mid_block.attentions.0.transformer_blocks.0.ff"] == 64
    assert all("forward" not in m.__dict__ for m in model.unet.modules())  # nothing patched any more


def test_folder_round_trips_through_load_compressed_unet(compressed):
    _, expected, folder = compressed
    unet = load_compressed_unet(folder / "unet")
    assert unet.dtype == torch.float64
    assert_close(unet_output(unet), expected)
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


def test_our_model_loading_and_diffusers_pipelines_take_the_folder(compressed):
    _, expected, folder = compressed
    assert_close(unet_output(load_stable_diffusion(folder).unet), expected)
    pipeline = StableDiffusionPipeline.from_pretrained(folder, unet=load_compressed_unet(folder / "unet"))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.to(torch.float32)
    image = pipeline("a toy", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    pipeline.unet.to(torch.float64)
    assert_close(unet_output(pipeline.unet), expected)


def test_stock_diffusers_refuses_instead_of_misloading(compressed):
    _, _, folder = compressed
    with pytest.raises(ValueError, match=r"ff\.net\.0\.proj\..* expected shape"):
        UNet2DConditionModel.from_pretrained(folder / "unet")


def test_single_file_export_is_refused(compressed, tmp_path):
    model, _, _ = compressed
    with pytest.raises(CheckpointError, match="narrowed feed-forwards, which no single-file"):
        save_ldm_checkpoint(model, tmp_path / "model.safetensors")
    assert not list(tmp_path.iterdir())


def test_meta_build_has_the_narrow_parameter_count():
    paths = [f"down_blocks.2.attentions.{j}.transformer_blocks.0.ff" for j in (0, 1)]
    paths += ["mid_block.attentions.0.transformer_blocks.0.ff"]
    paths += [f"up_blocks.1.attentions.{j}.transformer_blocks.0.ff" for j in (0, 1, 2)]
    stock = build_compressed_unet(SD15_UNET)
    narrow = build_compressed_unet({**SD15_UNET, FFN_WIDTHS_KEY: dict.fromkeys(paths, 960)})
    c, full, k = 1280, 5120, 960
    per_ffn = (c * 2 + 2 + c) * (full - k)  # proj rows (value + gate) with biases, net.2 columns
    assert count_parameters(stock) - count_parameters(narrow) == 6 * per_ffn
    assert next(narrow.parameters()).is_meta


def test_a_width_for_a_missing_ffn_is_named():
    with pytest.raises(CheckpointError, match="names down_blocks.9.attentions.0.transformer_blocks.0.ff"):
        build_compressed_unet({**SD15_UNET, FFN_WIDTHS_KEY: {"down_blocks.9.attentions.0.transformer_blocks.0.ff": 8}})


def test_weights_that_do_not_fit_the_widths_are_named(tiny_sd, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(tiny_sd.sd1_dir / "unet", folder)
    config = json.loads((folder / "config.json").read_text())
    config[FFN_WIDTHS_KEY] = {"mid_block.attentions.0.transformer_blocks.0.ff": 8}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit its config.json: size mismatch for mid_block"):
        load_compressed_unet(folder)


def test_stock_folders_load_unchanged(tiny_sd):
    unet = load_compressed_unet(tiny_sd.sd1_dir / "unet", torch.float64)
    reference = UNet2DConditionModel.from_pretrained(tiny_sd.sd1_dir / "unet", torch_dtype=torch.float64)
    assert_close(unet_output(unet), unet_output(reference.eval()))


def test_a_network_built_on_another_unet_is_refused_in_one_line(tiny_sd):
    model = load_stable_diffusion(tiny_sd.sd1_dir)
    other = load_stable_diffusion(tiny_sd.sd1_dir).unet
    network = lowrank_ffn.create_network(1.0, None, None, None, None, other, blocks="MID", ratio="0.5")
    with pytest.raises(ConfigError, match="^--network_weights: the narrow-FFN network was built on another UNet"):
        compress_unet(model.unet, network)
    assert not ffn_widths(model.unet)  # nothing narrowed
