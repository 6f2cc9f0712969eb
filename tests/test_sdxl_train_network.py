"""sdxl_train_network.py end to end on the tiny SDXL fixture: keys, caches, conditioning, resume, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import sdxl_train_network
from library.data.buckets import sdxl_size_conditioning
from library.errors import SuiteError
from library.fileio import read_state_dict
from library.models.sdxl import SDXL, load_sdxl
from library.models.sdxl_conditioning import encode_sdxl_prompt
from library.models.text_encoding import tokenize_captions
from networks.lora_file import load_lora_file
from tests.kohya_reference import kohya_sdxl_block, kohya_sdxl_module_names, sgm_paths_by_diffusers_converter

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def sdxl_argv(tiny_sd, data: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny_sd.sdxl_file),
        "--tokenizer_cache_dir", str(tiny_sd.tokenizer_cache_dir),
        "--train_data_dir", str(data / "img"),
        "--output_dir", str(data / "out"),
        "--output_name", "tiny",
        "--resolution", "64",
        "--caption_extension", ".txt",
        "--network_module", "networks.lora",
        "--network_dim", "4",
        "--network_alpha", "4",
        "--learning_rate", "1e-3",
        "--max_train_steps", "2",
        "--train_batch_size", "2",
        "--seed", "7",
        "--max_data_loader_n_workers", "0",
        *extra,
    ]  # fmt: skip


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_lora_file(path)[0]


def _expected_names(tiny_sd, convs: bool, text_encoders: bool) -> set[str]:
    model = load_sdxl(tiny_sd.sdxl_dir)
    sgm_unet = {k: v for k, v in read_state_dict(tiny_sd.sdxl_file).items() if k.startswith("model.diffusion_model.")}
    names = kohya_sdxl_module_names(
        model.text_encoders, model.unet, sgm_paths_by_diffusers_converter(sgm_unet, model.unet.config), convs
    )
    return {n for n in names if text_encoders or n.startswith("lora_unet_")}


@pytest.fixture(scope="module")
def sdxl_pipeline(tiny_sd):
    return StableDiffusionXLPipeline.from_pretrained(tiny_sd.sdxl_dir, local_files_only=True)


def test_lora_with_text_encoders_trains_with_kohyas_sdxl_keys_and_metadata(tiny_sd, data, sdxl_pipeline):
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, "--enable_bucket", "--bucket_reso_steps", "32",
                                      "--min_bucket_reso", "32", "--max_bucket_reso", "128"))  # fmt: skip
    path = data / "out" / "tiny.safetensors"
    tensors, metadata = load_lora_file(path)
    names = {key.partition(".")[0] for key in tensors}
    assert names == _expected_names(tiny_sd, convs=False, text_encoders=True)
    trained = [k for k, v in tensors.items() if k.endswith("lora_up.weight") and v.abs().sum() > 0]
    assert any(k.startswith("lora_te1_") for k in trained) and any(k.startswith("lora_te2_") for k in trained)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert metadata["modelspec.resolution"] == "64x64"
    sdxl_pipeline.load_lora_weights(str(path.parent), weight_name=path.name)  # diffusers maps every key
    sdxl_pipeline.unload_lora_weights()


def test_locon_unet_only_with_cached_text_outputs_on_disk(tiny_sd, data):
    argv = sdxl_argv(tiny_sd, data, "--network_args", "conv_dim=2", "conv_alpha=1", "--network_train_unet_only",
                     "--cache_text_encoder_outputs_to_disk", "--cache_latents")  # fmt: skip
    sdxl_train_network.main(argv)
    names = {key.partition(".")[0] for key in _tensors(data / "out" / "tiny.safetensors")}
    assert names == _expected_names(tiny_sd, convs=True, text_encoders=False)
    caches = sorted((data / "img" / "10_sks toy").glob("*_te_outputs.npz"))
    assert len(caches) == 6  # kohya's <image stem>_te_outputs.npz beside each image
    with np.load(caches[0]) as npz:
        assert set(npz.files) == {"hidden_state1", "hidden_state2", "pool2", "caption", "text_encoder_fingerprint"}
        assert npz["hidden_state1"].shape == (77, 64) and npz["hidden_state2"].shape == (77, 128)
        assert npz["pool2"].shape == (128,)
    model = load_sdxl(tiny_sd.sdxl_dir)
    caption = (data / "img" / "10_sks toy" / "toy_00.txt").read_text().strip()
    ids = [tokenize_captions(tokenizer, [caption]) for tokenizer in (model.tokenizer, model.tokenizer_2)]
    with torch.no_grad():
        hidden, pooled = encode_sdxl_prompt(model.text_encoder, model.text_encoder_2, *ids)
    with np.load(caches[0]) as npz:
        torch.testing.assert_close(torch.from_numpy(npz["hidden_state1"]), hidden[0, :, :64])
        torch.testing.assert_close(torch.from_numpy(npz["hidden_state2"]), hidden[0, :, 64:])
        torch.testing.assert_close(torch.from_numpy(npz["pool2"]), pooled[0])
        assert str(npz["caption"]) == caption
    mtime = caches[0].stat().st_mtime_ns
    sdxl_train_network.main([*argv[:-1], "--output_name", "again"])  # existing caches are reused
    assert caches[0].stat().st_mtime_ns == mtime


def test_block_dims_and_lr_weights_shape_an_sdxl_lora(tiny_sd, data):
    """kohya's 23 SDXL blocks: block_dims/alphas set each module's rank, lr weight 0 leaves a block out."""
    dims = [2 + i % 3 for i in range(23)]
    alphas = [float(d) / 2 for d in dims]
    down = "1.0,1.0,1.0,1.0,0.0"  # input_blocks 4 (block 5) gets lr weight 0
    argv = sdxl_argv(tiny_sd, data, "--network_train_unet_only", "--max_train_steps", "1", "--network_args",
                     f"block_dims={','.join(map(str, dims))}", f"block_alphas={','.join(map(str, alphas))}",
                     f"down_lr_weight={down}")  # fmt: skip
    sdxl_train_network.main(argv)
    tensors, metadata = load_lora_file(data / "out" / "tiny.safetensors")
    names = {key.partition(".")[0] for key in tensors}
    expected = {n for n in _expected_names(tiny_sd, convs=False, text_encoders=False) if kohya_sdxl_block(n) != 5}
    assert names == expected and len(expected) < len(_expected_names(tiny_sd, convs=False, text_encoders=False))
    for name in names:
        block = kohya_sdxl_block(name)
        assert tensors[f"{name}.lora_down.weight"].shape[0] == dims[block], name
        assert tensors[f"{name}.alpha"].item() == alphas[block], name
    assert {k: v for k, v in json.loads(metadata["ss_network_args"]).items() if k != "dropout"} == {
        "block_dims": ",".join(map(str, dims)),
        "block_alphas": ",".join(map(str, alphas)),
        "down_lr_weight": down,
    }


def test_cached_text_outputs_train_like_encoding_every_step(tiny_sd, data):
    common = ("--network_train_unet_only", "--max_train_steps", "3")
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, *common, "--output_name", "live"))
    sdxl_train_network.main(
        sdxl_argv(tiny_sd, data, *common, "--output_name", "cached", "--cache_text_encoder_outputs")
    )
    live, cached = _tensors(data / "out" / "live.safetensors"), _tensors(data / "out" / "cached.safetensors")
    assert set(live) == set(cached)
    for key in live:
        # Batched encoding rounds differently (~1e-7). Adam normalises each gradient element, so an element
        # whose gradient is near zero can move by up to one step (lr 1e-3) either way; the rest must agree.
        difference = (cached[key].float() - live[key].float()).abs()
        assert difference.max() <= 1e-3 * 3, key  # at most one full Adam step apart per step taken
        assert difference.mean() < 2e-5, key


def test_resume_from_state_continues_like_an_uninterrupted_run(tiny_sd, data):
    common = ("--max_train_steps", "4", "--lr_scheduler", "cosine", "--network_args", "conv_dim=2",
              "--min_timestep", "100", "--max_timestep", "900")  # fmt: skip
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, *common, "--save_every_n_steps", "2", "--save_state"))
    state = data / "out" / "tiny-step00000002-state"
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, *common, "--resume", str(state), "--output_name", "resumed"))
    first, second = _tensors(data / "out" / "tiny.safetensors"), _tensors(data / "out" / "resumed.safetensors")
    assert set(first) == set(second)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert load_lora_file(data / "out" / "resumed.safetensors")[1]["modelspec.timestep_range"] == "100,900"


@pytest.mark.parametrize(
    ("lrs", "trained"), [(("0", "5e-4"), False), (("5e-4", "0"), True)], ids=["0-first", "0-second"]
)
def test_text_encoder_lr_list_gives_both_encoders_the_first_value(tiny_sd, data, lrs, trained):
    """kohya's networks.lora has one text-encoder group: --text_encoder_lr a b trains te1 and te2 at a."""
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, "--text_encoder_lr", *lrs, "--max_train_steps", "1"))
    tensors = _tensors(data / "out" / "tiny.safetensors")
    for prefix in ("lora_te1_", "lora_te2_"):
        ups = [v for k, v in tensors.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert any(v.abs().sum() > 0 for v in ups) == trained, prefix


def test_size_conditioning_follows_kohya():
    # A portrait image in a 64x96 bucket: kohya fits it inside, 57.6 px wide, 3 px from the left.
    assert sdxl_size_conditioning((60, 100), (64, 96), flipped=False, bucketed=True) == ((100, 60), (0, 3), (96, 64))
    # Flipped: left = bucket width - right edge (64 - 60.6).
    assert sdxl_size_conditioning((60, 100), (64, 96), flipped=True, bucketed=True) == ((100, 60), (0, 3), (96, 64))
    assert sdxl_size_conditioning((200, 100), (128, 64), flipped=True, bucketed=True) == (
        (100, 200),
        (0, 0),
        (64, 128),
    )
    # Without buckets the image is cropped to the resolution: that is its original size, no crop.
    assert sdxl_size_conditioning((80, 80), (64, 64), flipped=False, bucketed=False) == ((64, 64), (0, 0), (64, 64))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--pretrained_model_name_or_path", "SD1"), "is an SD1.x/SD2.x checkpoint: this script needs an SDXL model"),
        (("--cache_text_encoder_outputs",), "--cache_text_encoder_outputs needs --network_train_unet_only"),
        (("--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"), "shuffle_caption"),
        (
            ("--cache_text_encoder_outputs", "--network_train_unet_only", "--caption_dropout_rate", "0.1"),
            "caption_dropout_rate",
        ),
        (("--enable_bucket", "--bucket_reso_steps", "48"), "--bucket_reso_steps must be a multiple of 32 for SDXL"),
        (("--tokenizer_cache_dir", "ONLY_FIRST"), "has no laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/vocab.json"),
        (("--v2",), "--v2/--v_parameterization are SD2 flags"),
    ],
    ids=["sd1-file", "cache-with-te", "cache-shuffle", "cache-dropout", "reso-steps", "no-tokenizer", "v2"],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tiny_sd, data, extra, message):
    if "ONLY_FIRST" in extra:  # a cache holding CLIP-L's tokenizer but not bigG's
        shutil.copytree(tiny_sd.tokenizer_cache_dir / SDXL.tokenizer_folder, data / "tok" / SDXL.tokenizer_folder)
    replace = {"SD1": str(tiny_sd.sd1_file), "ONLY_FIRST": str(data / "tok")}
    extra = tuple(replace.get(e, e) for e in extra)
    with pytest.raises(SuiteError) as err:
        sdxl_train_network.main(sdxl_argv(tiny_sd, data, *extra))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (data / "out").exists()
    assert not list((data / "img").rglob("*.npz"))


def test_cli_refuses_an_sd1_model_with_status_2(tiny_sd, data):
    argv = sdxl_argv(tiny_sd, data, "--pretrained_model_name_or_path", str(tiny_sd.sd1_file))
    result = subprocess.run([sys.executable, "sdxl_train_network.py", *argv], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "this script needs an SDXL model" in result.stderr.strip().splitlines()[-1]
    assert not (data / "out").exists()


@pytest.mark.parametrize("module", ["networks.lilora", "networks.lowrank_ffn", "networks.dylora", "networks.lora_fa"])
def test_other_network_families_train_on_sdxl_with_sgm_names(tiny_sd, data, module):
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, "--network_module", module, "--max_train_steps", "1"))
    names = {key.partition(".")[0] for key in _tensors(data / "out" / "tiny.safetensors")}
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert unet and all(
        n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in unet
    )
    if module != "networks.lowrank_ffn":  # the others adapt LoRA's layers
        assert names <= _expected_names(tiny_sd, convs=False, text_encoders=True)
        assert any(n.startswith("lora_te2_") for n in names)
