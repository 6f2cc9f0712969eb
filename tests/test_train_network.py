"""train_network.py end to end on the tiny fixtures: training, saving, resuming, errors."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_network
from library.errors import SuiteError
from library.models.stable_diffusion import load_stable_diffusion
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.training.noise import NoiseOptions, make_noise, noisy_latents, prediction_target, sample_timesteps
from networks import lora
from networks.lora_file import load_lora_file

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def base_argv(tiny_sd, data: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir),
        "--train_data_dir", str(data / "img"),
        "--output_dir", str(data / "out"),
        "--output_name", "tiny",
        "--resolution", "64",
        "--caption_extension", ".txt",
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--network_alpha", "4",
        "--learning_rate", "1e-3",
        "--optimizer_type", "AdamW",
        "--max_train_steps", "4",
        "--seed", "7",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]  # fmt: skip


def _image_tensor(path: Path) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((64, 64))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def fixed_batch_loss(model_dir: Path, image_dir: Path, lora_path: Path | None = None, seed: int = 123) -> float:
    """Loss on fixed images, captions, noise and timesteps, with or without a trained LoRA."""
    model = load_stable_diffusion(model_dir)
    pngs = sorted(image_dir.glob("*.png"))[:4]
    images = torch.stack([_image_tensor(p) for p in pngs])
    captions = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    if lora_path is not None:
        network, weights = lora.create_network_from_weights(
            1.0, str(lora_path), model.vae, model.text_encoder, model.unet
        )
        network.apply_to(model.text_encoder, model.unet)
        network.load_state_dict(weights, strict=True)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        latents = model.vae.encode(images).latent_dist.sample() * model.vae.config.scaling_factor
        hidden = encode_tokens(model.text_encoder, tokenize_captions(model.tokenizer, captions))
        options = NoiseOptions()
        noise = make_noise(latents, options)
        timesteps = sample_timesteps(latents.shape[0], options, latents.device)
        noisy = noisy_latents(model.noise_scheduler, latents, noise, timesteps, options)
        prediction = model.unet(noisy, timesteps, hidden).sample
        target = prediction_target(model.noise_scheduler, latents, noise, timesteps)
        return torch.nn.functional.mse_loss(prediction, target).item()


@pytest.mark.parametrize(
    ("network_args", "precision"),
    [([], "no"), (["--network_args", "conv_dim=4", "conv_alpha=4"], "no"), (["--network_args", "conv_dim=4"], "bf16")],
    ids=["lora-fp32", "locon-fp32", "locon-bf16"],
)
def test_training_lowers_the_loss_on_fixed_batches(tiny_sd, data, network_args, precision):
    train_network.main(
        base_argv(tiny_sd, data, "--max_train_steps", "30", "--mixed_precision", precision, *network_args)
    )
    saved = data / "out" / "tiny.safetensors"
    images = data / "img" / "10_sks toy"
    before = fixed_batch_loss(tiny_sd.sd1_dir, images)
    after = fixed_batch_loss(tiny_sd.sd1_dir, images, saved)
    assert after < before * 0.98, (before, after)
    tensors, metadata = load_lora_file(saved)
    if network_args:
        assert any("resnets" in k for k in tensors)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_steps"] == "30" and metadata["ss_mixed_precision"] == precision


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_lora_file(path)[0]


def _assert_same_tensors(a: Path, b: Path) -> None:
    first, second = _tensors(a), _tensors(b)
    assert set(first) == set(second)
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def test_metadata_and_hashes_describe_the_run(tiny_sd, data):
    train_network.main(base_argv(tiny_sd, data, "--reg_data_dir", str(data / "reg"), "--network_dim", "8"))
    path = data / "out" / "tiny.safetensors"
    tensors, metadata = load_lora_file(path)
    down = next(v for k, v in tensors.items() if k.endswith("lora_down.weight"))
    assert metadata["ss_network_dim"] == str(down.shape[0]) == "8"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_num_train_images"] == "60" and metadata["ss_num_reg_images"] == "2"  # kohya: before balancing
    assert "sks toy" in metadata["ss_tag_frequency"]
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    data_bytes = path.read_bytes()
    header = int.from_bytes(data_bytes[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data_bytes[8 + header :]).hexdigest()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)


def test_network_weights_are_loaded_bit_exactly(tiny_sd, data):
    train_network.main(base_argv(tiny_sd, data))
    first = data / "out" / "tiny.safetensors"
    again = base_argv(
        tiny_sd, data, "--network_weights", str(first), "--max_train_steps", "0", "--output_name", "again"
    )
    train_network.main(again)
    _assert_same_tensors(first, data / "out" / "again.safetensors")


def test_resume_from_state_continues_like_an_uninterrupted_run(tiny_sd, data):
    # 60 images at batch 6 = 10 batches per epoch; with accumulation 2, 5 steps per epoch. The state is
    # saved mid-epoch (step 3) and the run crosses into the next epoch.
    common = ("--train_batch_size", "6", "--gradient_accumulation_steps", "2", "--max_train_steps", "8",
              "--optimizer_type", "AdamW", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--network_args",
              "conv_dim=2", "--noise_offset", "0.05")  # fmt: skip
    train_network.main(base_argv(tiny_sd, data, *common, "--save_every_n_steps", "3", "--save_state"))
    state = data / "out" / "tiny-step00000003-state"
    assert (state / "train_state.json").is_file()
    resumed = base_argv(tiny_sd, data, *common, "--resume", str(state), "--output_name", "resumed")
    train_network.main(resumed)
    _assert_same_tensors(data / "out" / "tiny.safetensors", data / "out" / "resumed.safetensors")
    assert load_lora_file(data / "out" / "resumed.safetensors")[1]["ss_steps"] == "8"


def test_epoch_checkpoints_follow_kohyas_names_and_rotation(tiny_sd, data):
    (data / "img" / "10_sks toy").rename(data / "img" / "1_sks toy")  # one batch of 6 per epoch
    train_network.main(
        base_argv(tiny_sd, data, "--train_batch_size", "6", "--max_train_steps", "40", "--max_train_epochs", "4",
                  "--save_every_n_epochs", "1", "--save_last_n_epochs", "2", "--save_model_as", "safetensors")
    )  # fmt: skip
    names = sorted(p.name for p in (data / "out").iterdir())
    assert names == ["tiny-000002.safetensors", "tiny-000003.safetensors", "tiny.safetensors"]
    assert load_lora_file(data / "out" / "tiny.safetensors")[1]["ss_steps"] == "4"  # epochs override steps


def test_kohya_style_config_files(tiny_sd, data):
    config = data / "config.toml"
    dataset = data / "dataset.toml"
    # The table layout of the kohya_ss GUI's exported configs; values for the tiny fixture.
    config.write_text(
        f"""
[model_arguments]
pretrained_model_name_or_path = "{tiny_sd.sd1_file}"
tokenizer_cache_dir = "{tiny_sd.tokenizer_cache_dir}"
v2 = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
network_args = ["conv_dim=2", "conv_alpha=1"]
network_train_unet_only = false

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 0.0005
unet_lr = 0.0005
text_encoder_lr = 0.0001
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 1
max_grad_norm = 1.0

[dataset_arguments]
dataset_config = "{dataset}"
cache_latents = true

[training_arguments]
output_dir = "{data / "out"}"
output_name = "configured"
save_precision = "fp16"
max_train_steps = 3
seed = 1
mixed_precision = "no"
max_data_loader_n_workers = 0
huggingface_repo_id = ""
"""
    )
    dataset.write_text(
        f"""
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{data / "img" / "10_sks toy"}"
  class_tokens = "sks toy"
  num_repeats = 2

  [[datasets.subsets]]
  is_reg = true
  image_dir = "{data / "reg" / "1_toy"}"
  class_tokens = "toy"
  num_repeats = 1
"""
    )
    train_network.main(["--config_file", str(config)])
    tensors, metadata = load_lora_file(data / "out" / "configured.safetensors")
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert metadata["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
    assert '"num_repeats": 2' in metadata["ss_datasets"]


def test_tensorboard_scalars_and_sample_images(tiny_sd, data):
    prompts = data / "prompts.txt"
    prompts.write_text("sks toy, red, cube --w 64 --h 64 --s 2 --d 5\n")
    train_network.main(
        base_argv(tiny_sd, data, "--logging_dir", str(data / "logs"), "--log_with", "tensorboard",
                  "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_sampler", "euler_a")
    )  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((data / "logs").iterdir())
    events = EventAccumulator(str(next(runs[0].rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss/current", "loss/average", "lr/unet"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("loss/current")) == 4
    samples = sorted((data / "out" / "sample").glob("tiny_000002_00_*_5.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (64, 64)


def test_fp16_run_samples_through_a_float32_vae_decode(tiny_sd, data):
    """fp16 latents go through the float32 VAE (the pipeline's own decode clashed on the CPU)."""
    prompts = data / "prompts.txt"
    prompts.write_text("sks toy --w 64 --h 64 --s 2 --d 5\n")
    train_network.main(base_argv(tiny_sd, data, "--max_train_steps", "1", "--mixed_precision", "fp16",
                                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "1"))  # fmt: skip
    (sample,) = (data / "out" / "sample").glob("tiny_000001_00_*_5.png")
    assert np.asarray(Image.open(sample), dtype=np.float32).std() > 1  # an image, not NaN-black


def test_sd2_v_prediction_single_file_with_options(tiny_sd, data):
    argv = base_argv(tiny_sd, data, "--pretrained_model_name_or_path", str(tiny_sd.sd2_file), "--v2",
                     "--v_parameterization", "--tokenizer_cache_dir", str(tiny_sd.tokenizer_cache_dir),
                     "--clip_skip", "2", "--max_token_length", "150", "--min_snr_gamma", "5", "--noise_offset", "0.1",
                     "--loss_type", "huber", "--flip_aug", "--shuffle_caption", "--keep_tokens", "1",
                     "--network_train_unet_only", "--max_train_steps", "2")  # fmt: skip
    train_network.main(argv)
    tensors, metadata = load_lora_file(data / "out" / "tiny.safetensors")
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
    assert tensors and not any(k.startswith("lora_te_") for k in tensors)


def test_missing_captions_fall_back_to_class_tokens(tiny_sd, data):
    for caption in (data / "img" / "10_sks toy").glob("*.txt"):
        caption.unlink()
    train_network.main(base_argv(tiny_sd, data, "--max_train_steps", "1"))
    assert '"sks toy": 6}' in load_lora_file(data / "out" / "tiny.safetensors")[1]["ss_tag_frequency"]


def _break_image(data: Path) -> None:
    (data / "img" / "10_sks toy" / "toy_00.png").write_bytes(b"not a png")


def _empty_folder(data: Path) -> None:
    for file in (data / "img" / "10_sks toy").iterdir():
        file.unlink()


@pytest.mark.parametrize(
    ("prepare", "extra", "message"),
    [
        (_empty_folder, (), "no training images"),
        (_break_image, (), "toy_00.png"),
        (None, ("--resolution", "96", "--enable_bucket"), "bucket_reso_steps"),
        (None, ("--optimizer_type", "NoSuchOptimizer"), "NoSuchOptimizer"),
        (None, ("--network_module", "networks.does_not_exist"), "networks.does_not_exist"),
        (None, ("--network_args", "conv_dimm=4"), "conv_dimm"),
    ],
    ids=["empty-folder", "broken-image", "resolution-vs-buckets", "unknown-optimizer", "bad-module", "bad-arg"],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tiny_sd, data, prepare, extra, message):
    if prepare:
        prepare(data)
    with pytest.raises(SuiteError) as err:
        train_network.main(base_argv(tiny_sd, data, *extra))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (data / "out").exists()


def test_cli_reports_errors_as_one_line_and_status_2(tiny_sd, data):
    argv = base_argv(tiny_sd, data, "--optimizer_type", "NoSuchOptimizer")
    result = subprocess.run([sys.executable, "train_network.py", *argv], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --optimizer_type 'NoSuchOptimizer'")


def test_two_processes_end_with_identical_weights(tiny_sd, data):
    argv = base_argv(tiny_sd, data, "--max_train_steps", "3")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    result = subprocess.run(
        [*launch, "train_network.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained weights identical on 2 processes" in result.stderr
    assert "x 30 batches" in result.stderr  # each process saw half of the 60 batches


def test_dim_from_weights_max_norm_and_text_encoder_only(tiny_sd, data):
    train_network.main(base_argv(tiny_sd, data, "--network_dim", "6", "--output_name", "first"))
    first = data / "out" / "first.safetensors"
    train_network.main(
        base_argv(tiny_sd, data, "--network_weights", str(first), "--dim_from_weights", "--scale_weight_norms", "0.5",
                  "--network_train_text_encoder_only", "--output_name", "second", "--logging_dir", str(data / "logs"))
    )  # fmt: skip
    tensors, metadata = load_lora_file(data / "out" / "second.safetensors")
    assert tensors and all(k.startswith("lora_te_") for k in tensors)
    assert metadata["ss_network_dim"] == "6"
    downs = {k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")}
    for name in downs:  # max-norm regularisation keeps every module's update norm at most 0.5
        down, up, alpha = (
            tensors[f"{name}.lora_down.weight"],
            tensors[f"{name}.lora_up.weight"],
            tensors[f"{name}.alpha"],
        )
        norm = (up.flatten(1) @ down.flatten(1) * alpha / down.shape[0]).norm()
        assert norm <= 0.5 + 1e-4


def test_base_weights_are_merged_with_their_multiplier(tiny_sd, data):
    from library.training.args import parse_args, train_network_parser
    from library.training.network_trainer import NetworkTrainer

    train_network.main(base_argv(tiny_sd, data, "--output_name", "base"))
    base = str(data / "out" / "base.safetensors")

    def merged_unet(*extra):
        args = parse_args(train_network_parser(), base_argv(tiny_sd, data, "--base_weights", base, *extra))
        model = load_stable_diffusion(tiny_sd.sd1_dir)
        NetworkTrainer(args)._merge_base_weights(lora, model)
        return model.unet.state_dict()

    original = load_stable_diffusion(tiny_sd.sd1_dir).unet.state_dict()
    full, half = merged_unet(), merged_unet("--base_weights_multiplier", "0.5")
    changed = [k for k in original if not torch.equal(full[k], original[k])]
    assert changed
    for key in changed:
        torch.testing.assert_close(half[key] - original[key], (full[key] - original[key]) / 2, rtol=1e-4, atol=1e-6)
