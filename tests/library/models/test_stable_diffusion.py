"""Loading the tiny fixtures in every format, and the errors users see for bad inputs."""

import logging
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import CheckpointError, SuiteError, TokenizerNotFoundError
from library.fileio import atomic_path, read_state_dict
from library.models.stable_diffusion import load_stable_diffusion, save_diffusers_folder, save_ldm_checkpoint
from library.tiny_sd import build_tiny_model, write_tiny_tokenizer


class TrainerCallback:
    """Stands in for the Lightning objects that old .ckpt files pickle beside the weights."""


def _outputs(model):
    """Text-encoder, UNet and VAE outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = model.tokenizer(["sks toy, red, cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.text_encoder(ids).last_hidden_state
        latents = torch.randn(1, 4, 8, 8, generator=generator)
        noise_pred = model.unet(latents, torch.tensor([500]), hidden).sample
        image = torch.randn(1, 3, 64, 64, generator=generator)
        posterior = model.vae.encode(image).latent_dist.mean
    return hidden, noise_pred, posterior


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_folder_and_single_file_give_identical_outputs(tiny_sd, name):
    folder = load_stable_diffusion(tiny_sd.root / name)
    single = load_stable_diffusion(
        tiny_sd.root / f"{name}.safetensors", tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir
    )
    assert (folder.v2, folder.v_parameterization) == (single.v2, single.v_parameterization) == ((name == "sd2",) * 2)
    for a, b in zip(_outputs(folder), _outputs(single)):
        assert torch.equal(a, b)
    assert folder.base_model_version == ("sd_v2_v" if name == "sd2" else "sd_v1")


def test_ckpt_format_loads_like_safetensors_and_ignores_pickled_objects(tiny_sd, tmp_path):
    state = read_state_dict(tiny_sd.sd1_file)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "callbacks": TrainerCallback(), "global_step": 470000}, ckpt)
    a = load_stable_diffusion(ckpt, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    b = load_stable_diffusion(tiny_sd.sd1_file, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)


def test_save_ckpt_and_diffusers_round_trip(tiny_sd, tmp_path):
    model = load_stable_diffusion(tiny_sd.sd2_dir)
    save_ldm_checkpoint(model, tmp_path / "m.ckpt")
    save_diffusers_folder(model, tmp_path / "folder")
    again = load_stable_diffusion(tmp_path / "folder")
    from_ckpt = load_stable_diffusion(
        tmp_path / "m.ckpt", v_parameterization=True, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir
    )
    for module in ("unet", "vae", "text_encoder"):
        ref = getattr(model, module).state_dict()
        for other in (again, from_ckpt):
            got = getattr(other, module).state_dict()
            assert set(got) == set(ref)
            assert all(torch.equal(got[k], ref[k]) for k in ref), module


def test_saved_text_encoder_keeps_canonical_text_model_names(tiny_sd, tmp_path):
    save_diffusers_folder(load_stable_diffusion(tiny_sd.sd1_dir), tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_saved_folder_runs_in_stable_diffusion_pipeline(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd.sd1_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("sks toy", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_v_parameterization_comes_from_flag_or_yaml(tiny_sd, tmp_path):
    bare = tmp_path / "sd2.safetensors"
    shutil.copy(tiny_sd.sd2_file, bare)  # without the yaml beside it
    cache = tiny_sd.tokenizer_cache_dir
    assert not load_stable_diffusion(bare, tokenizer_cache_dir=cache).v_parameterization
    assert load_stable_diffusion(bare, v_parameterization=True, tokenizer_cache_dir=cache).v_parameterization
    assert load_stable_diffusion(tiny_sd.sd2_file, tokenizer_cache_dir=cache).v_parameterization


def test_wrong_v2_flag_is_corrected_with_a_warning(tiny_sd, caplog):
    with caplog.at_level(logging.WARNING):
        model = load_stable_diffusion(tiny_sd.sd2_file, v2=False, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    assert model.v2
    assert "--v2" in caplog.text


def test_tokenizer_cache_dir_may_point_at_the_tokenizer_itself(tiny_sd):
    direct = tiny_sd.tokenizer_cache_dir / "openai_clip-vit-large-patch14"
    model = load_stable_diffusion(tiny_sd.sd1_file, tokenizer_cache_dir=direct)
    assert (
        model.tokenizer("sks toy").input_ids == load_stable_diffusion(tiny_sd.sd1_dir).tokenizer("sks toy").input_ids
    )


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    tokenizer = write_tiny_tokenizer(tmp_path / "tok", v2=False)
    state = torch.get_rng_state()
    a = build_tiny_model(False, tokenizer, seed=3).unet.state_dict()
    b = build_tiny_model(False, tokenizer, seed=3).unet.state_dict()
    c = build_tiny_model(False, tokenizer, seed=4).unet.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_tokenizer_knows_the_caption_words(tiny_sd):
    tokenizer = load_stable_diffusion(tiny_sd.sd1_dir).tokenizer
    ids = tokenizer("sks toy").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 4  # one token per known word


# ---- errors -----------------------------------------------------------------------------------


def _assert_one_line(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message


def test_truncated_safetensors_is_reported_with_its_name(tiny_sd, tmp_path):
    broken = tmp_path / "broken.safetensors"
    data = tiny_sd.sd1_file.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_stable_diffusion(broken, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    _assert_one_line(err, broken)


def test_corrupt_ckpt_is_reported_with_its_name(tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_stable_diffusion(broken)
    _assert_one_line(err, broken)


def test_lora_file_is_not_mistaken_for_a_model(tmp_path):
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(CheckpointError, match="--network_weights") as err:
        load_stable_diffusion(lora)
    _assert_one_line(err, lora)


def test_missing_tokenizer_says_how_to_provide_one(tiny_sd, tmp_path):
    with pytest.raises(TokenizerNotFoundError, match="--tokenizer_cache_dir") as err:
        load_stable_diffusion(tiny_sd.sd1_file, tokenizer_cache_dir=tmp_path)
    _assert_one_line(err, tiny_sd.sd1_file)
    with pytest.raises(TokenizerNotFoundError, match="--tokenizer_cache_dir"):
        load_stable_diffusion(tiny_sd.sd1_file)


def test_missing_model_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as err:
        load_stable_diffusion(tmp_path / "nope")
    _assert_one_line(err, tmp_path / "nope")
    assert isinstance(err.value, SuiteError)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_the_usual_file_mode(tmp_path):
    import os

    from library.fileio import atomic_directory

    mask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "file.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "a").write_text("a")
    finally:
        os.umask(mask)
    assert (tmp_path / "file.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
