"""tools/compress_ffn.py end to end on the tiny SD1 model: every stage, chained by its files."""

import json
import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL
from PIL import Image

from library.errors import ConfigError
from library.ffn_compression import pipeline
from library.ffn_compression.calibration import Calibration
from library.ffn_compression.pipeline import STAGES, parse_stage_args
from library.ffn_compression.unet import ffn_widths, load_compressed_unet
from library.models.stable_diffusion import load_stable_diffusion
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.training.model_setup import load_training_model
from library.training.noise import NoiseOptions, make_noise, noisy_latents, prediction_target, sample_timesteps
from networks import lowrank_ffn
from networks.lora_file import load_lora_file
from tools import compress_ffn

# Every FFN of the tiny UNet: those at its 8x8 stage are the ones that move its loss most.
BLOCKS = "blocks=all"
FFN_PATHS = [f"down_blocks.{i}.attentions.{j}" for i in (0, 1, 2) for j in (0, 1)] + ["mid_block.attentions.0"]
FFN_PATHS += [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in (0, 1, 2)]
FFN_PATHS = [f"{path}.transformer_blocks.0.ff" for path in FFN_PATHS]
WIDTHS = {path: (32 if path.startswith(("down_blocks.0", "up_blocks.3")) else 64) for path in FFN_PATHS}  # 4C / 4
MID = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def work(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_ffn")
    shutil.copytree(tiny_sd.train_data_dir, root / "img")
    prompts = ["a red toy --w 64 --h 64 --s 4 --d 1", "small blue ball --n cube --s 4 --w 64 --h 64"]
    (root / "prompts.txt").write_text("\n".join(prompts))
    return root


def run(stage, tiny_sd, work, *extra):
    argv = [stage, "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir), "--output_dir", str(work / "out")]
    argv += ["--train_data_dir", str(work / "img"), "--caption_extension", ".txt", "--resolution", "64"]
    argv += ["--seed", "5", "--max_data_loader_n_workers", "0", *extra]
    return compress_ffn.main(argv)


@pytest.fixture(scope="module")
def calibration_file(tiny_sd, work):
    AcceleratorState._reset_state(reset_partial_state=True)
    extra = ["--calib_prompts", str(work / "prompts.txt"), "--calib_max_batches", "16", "--calib_holdout_every", "4"]
    return run("calibrate", tiny_sd, work, "--network_args", BLOCKS, *extra)


@pytest.fixture(scope="module")
def init_files(tiny_sd, work, calibration_file):
    return {
        method: run("init", tiny_sd, work, "--calib_file", str(calibration_file), "--init", method,
                    "--network_args", BLOCKS, "ratio=0.25", "--output_name", f"ffn_{method}")
        for method in ("pca", "prune")
    }  # fmt: skip


@pytest.fixture(scope="module")
def blockwise_file(tiny_sd, work, calibration_file, init_files):
    AcceleratorState._reset_state(reset_partial_state=True)
    return run("blockwise", tiny_sd, work, "--calib_file", str(calibration_file), "--network_weights",
               str(init_files["pca"]), "--max_train_steps", "30", "--token_batch_size", "128")  # fmt: skip


@pytest.fixture(scope="module")
def theseus_file(tiny_sd, work, blockwise_file):
    AcceleratorState._reset_state(reset_partial_state=True)
    # p = 0.3 at step 0, 1 from step 10 on: the last 30 steps fine-tune the narrow model end to end.
    return run("theseus", tiny_sd, work, "--network_weights", str(blockwise_file), "--theseus_schedule",
               "linear:0.07,0.3", "--max_train_steps", "40", "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
               "--output_name", "theseus")  # fmt: skip


def test_calibration_covers_prompts_and_images_with_held_out_items(calibration_file):
    calibration = Calibration.load(calibration_file)
    assert calibration.info["prompts"] == 2 and calibration.info["image_batches"] == 16
    assert calibration.info["timesteps"] == 4
    assert len(calibration.stats) == 16 and set(calibration.heldout) == set(calibration.stats)
    # MID sees one token per sample: 2 prompts x 4 steps x (negative, prompt), and 12 fit batches (every
    # 4th of 16 held out) x 4 timesteps x (caption, empty caption).
    assert calibration.stats[MID].count == 2 * 4 * 2 + 12 * 4 * 2
    assert len(calibration.heldout[MID]) == 4 * 4 * 2


def test_init_files_record_method_widths_and_held_out_errors(init_files):
    for method, path in init_files.items():
        tensors, metadata = load_lora_file(path)
        assert metadata["lowrank_ffn_init"] == method and metadata["ss_network_module"] == "networks.lowrank_ffn"
        widths = json.loads(metadata["lowrank_ffn_widths"])
        assert widths == {"lora_unet_" + path.replace(".", "_"): width for path, width in WIDTHS.items()}
        errors = json.loads(metadata["lowrank_ffn_heldout_error"])
        assert set(errors) == set(widths) and all(0 < e < 1 for e in errors.values())


def fixed_loss(tiny_sd, work, weights) -> float:
    """Diffusion loss of the tiny SD1 model with the narrow FFNs of ``weights``, on fixed images, noise and t."""
    model = load_stable_diffusion(tiny_sd.sd1_dir)
    network, _ = lowrank_ffn.create_network_from_weights(1.0, weights, None, None, model.unet)
    network.apply_to(None, model.unet)
    network.load_weights(weights)
    pngs = sorted((work / "img" / "10_sks toy").glob("*.png"))[:4]
    images = [np.asarray(Image.open(p).convert("RGB").resize((64, 64)), dtype=np.float32) for p in pngs]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    captions = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(11)
        latents = model.vae.encode(pixels).latent_dist.sample() * model.vae.config.scaling_factor
        hidden = encode_tokens(model.text_encoder, tokenize_captions(model.tokenizer, captions))
        options = NoiseOptions()
        noise, timesteps = make_noise(latents, options), sample_timesteps(len(latents), options, latents.device)
        noisy = noisy_latents(model.noise_scheduler, latents, noise, timesteps, options)
        prediction = model.unet(noisy, timesteps, hidden)
        target = prediction_target(model.noise_scheduler, latents, noise, timesteps)
        return torch.nn.functional.mse_loss(prediction.sample, target).item()


def test_end_to_end_loss_after_theseus_is_lower_than_right_after_the_swap(tiny_sd, work, blockwise_file, theseus_file):
    assert fixed_loss(tiny_sd, work, theseus_file) < 0.98 * fixed_loss(tiny_sd, work, blockwise_file)
    metadata = load_lora_file(theseus_file)[1]
    assert metadata["lowrank_ffn_init"] == "pca" and metadata["ss_steps"] == "40"


def test_export_writes_a_folder_with_the_narrow_ffns_built_in(tiny_sd, work, theseus_file):
    folder = run("export", tiny_sd, work, "--network_weights", str(theseus_file), "--output_name", "compressed")
    unet = load_compressed_unet(folder / "unet")
    assert ffn_widths(unet) == WIDTHS
    reference = load_stable_diffusion(tiny_sd.sd1_dir)
    network, _ = lowrank_ffn.create_network_from_weights(1.0, theseus_file, None, None, reference.unet)
    network.apply_to(None, reference.unet)
    network.load_weights(theseus_file)
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        torch.testing.assert_close(unet(latents, 300, context).sample, reference.unet(latents, 300, context).sample)


def test_stages_name_what_they_miss(tiny_sd, work):
    with pytest.raises(ConfigError, match="calibrate needs --calib_prompts and/or images"):
        compress_ffn.main(["calibrate", "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir), "--output_dir", "x"])
    with pytest.raises(ConfigError, match="init needs --calib_file"):
        run("init", tiny_sd, work, "--network_args", "ratio=0.5")
    with pytest.raises(ConfigError, match="blockwise needs --network_weights"):
        run("blockwise", tiny_sd, work, "--calib_file", "any.safetensors")
    with pytest.raises(ConfigError, match="'.*prompts.txt' is not a calibration file"):
        run("init", tiny_sd, work, "--calib_file", str(work / "prompts.txt"), "--network_args", "ratio=0.5")


def test_one_config_file_with_list_flags_serves_every_stage(tmp_path):
    config = tmp_path / "ffn.toml"
    config.write_text('output_dir = "out"\nseed = 1\nnetwork_args = ["blocks=IN7,MID", "ratio=0.25"]\n')
    for stage in STAGES:
        args = parse_stage_args([stage, "--config_file", str(config), "--calib_file", "c.safetensors", "--seed", "2"])
        assert args.stage == stage and args.network_args == ["blocks=IN7,MID", "ratio=0.25"]
        assert args.calib_file == "c.safetensors" and args.seed == 2  # the command line wins over the file


def test_the_stage_comes_first(capsys):
    with pytest.raises(SystemExit):
        parse_stage_args(["--seed", "1", "init"])
    assert "the first argument must be the stage: one of calibrate, init, blockwise, theseus, export" in (
        capsys.readouterr().err
    )


class StageStopped(Exception):
    """Raised by the spy once the stage has loaded its model: the rest of the stage is not under test."""


@pytest.mark.parametrize("stage", ["calibrate", "init", "blockwise"])
def test_calibrate_init_and_blockwise_load_the_model_with_vae_and_zero_terminal_snr(
    stage, tiny_sd, work, calibration_file, monkeypatch
):
    loaded = []

    def spy(args, path=None):
        loaded.append(load_training_model(args, path))
        raise StageStopped

    monkeypatch.setattr(pipeline, "load_training_model", spy)
    other_vae = tiny_sd.sd2_dir / "vae"
    extra = ["--vae", str(other_vae), "--zero_terminal_snr", "--network_args", BLOCKS]
    extra += ["--calib_file", str(calibration_file), "--network_weights", str(calibration_file)]
    if stage == "calibrate":
        extra += ["--calib_prompts", str(work / "prompts.txt")]
    with pytest.raises(StageStopped):
        run(stage, tiny_sd, work, *extra)
    (model,) = loaded
    expected = AutoencoderKL.from_pretrained(other_vae).state_dict()
    stock = load_stable_diffusion(tiny_sd.sd1_dir).vae.state_dict()
    assert any(not torch.equal(stock[key], value) for key, value in expected.items())  # a VAE that differs
    assert all(torch.equal(model.vae.state_dict()[key], value) for key, value in expected.items())
    # Zero terminal SNR (Lin et al. 2023): the last timestep's signal is exactly zero.
    assert model.noise_scheduler.alphas_cumprod[-1] == 0 and model.noise_scheduler.alphas_cumprod[0] > 0


def test_a_broken_image_or_a_taken_export_is_refused_before_the_model_loads(tiny_sd, work, tmp_path, monkeypatch):
    from library.errors import DatasetError

    def no_model(args):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(pipeline, "load_training_model", no_model)
    images = tmp_path / "img"
    shutil.copytree(work / "img", images)
    broken = next(images.rglob("*.png"))
    broken.write_bytes(b"not a png")
    argv = ["calibrate", "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir), "--output_dir", str(tmp_path / "o")]
    argv += ["--train_data_dir", str(images), "--caption_extension", ".txt", "--resolution", "64"]
    with pytest.raises(DatasetError, match=broken.name):
        compress_ffn.main(argv)
    assert not (tmp_path / "o").exists()  # nothing left behind
    taken = tmp_path / "out" / "compressed"
    taken.mkdir(parents=True)
    (taken / "model_index.json").write_text("{}")
    argv = ["export", "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ConfigError, match="compressed' already exists"):
        compress_ffn.main([*argv, "--network_weights", str(tmp_path / "any.safetensors")])


def test_a_second_stage_on_the_same_output_is_refused(tiny_sd, work, tmp_path):
    import os
    import socket

    from library.training.output_lock import lock_path

    (tmp_path / "out").mkdir()
    other_run = {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier"}  # alive, not us
    lock_path(tmp_path / "out", "ffn_pca").write_text(json.dumps(other_run))
    run_args = ["init", "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir)]
    run_args += ["--output_dir", str(tmp_path / "out"), "--calib_file", str(work / "prompts.txt")]
    with pytest.raises(ConfigError, match=f"'ffn_pca' is in use by process {os.getppid()}"):
        compress_ffn.main([*run_args, "--network_args", "ratio=0.5"])
