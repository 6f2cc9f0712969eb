"""sdxl_train_network.py with each network family on the tiny SDXL fixture: LoCon, LoRA, Light LoRA and
lowrank_ffn, with live or cached text-encoder outputs, with or without text-encoder training.

Key lists come from kohya's SDXL naming rule, written here and in tests/kohya_reference.py from the
module classes and diffusers' own SGM converter, never from this suite's naming code.
"""

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import sdxl_train_network
from library.fileio import read_state_dict
from library.models.sdxl import load_sdxl
from networks.lora_file import load_lora_file
from tests.kohya_reference import sgm_paths_by_diffusers_converter
from tests.test_sdxl_train_network import _expected_names, sdxl_argv

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

FFN_TENSORS = {"net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"}
MODULES = {
    "locon": ("networks.lora", "--network_args", "conv_dim=2", "conv_alpha=1"),
    "lora": ("networks.lora",),
    "lilora": ("networks.lilora", "--network_args", "aux_down=8", "aux_up=8"),
    "lowrank_ffn": ("networks.lowrank_ffn", "--network_dim", "16"),
}
MODES = {"te": (), "cached": ("--network_train_unet_only", "--cache_text_encoder_outputs")}


def kohya_sdxl_ffn_names(tiny_sd) -> set[str]:
    """kohya's SDXL name of every transformer feed-forward: ``lora_unet_`` + its SGM module path."""
    model = load_sdxl(tiny_sd.sdxl_dir)
    sgm_unet = {k: v for k, v in read_state_dict(tiny_sd.sdxl_file).items() if k.startswith("model.diffusion_model.")}
    paths = sgm_paths_by_diffusers_converter(sgm_unet, model.unet.config)
    names = set()
    for name, module in model.unet.named_modules():
        if module.__class__.__name__ == "BasicTransformerBlock":
            sgm_key = paths[f"{name}.ff.net.2.weight"]
            path = sgm_key.removeprefix("model.diffusion_model.").removesuffix(".net.2.weight")
            names.add("lora_unet_" + path.replace(".", "_"))
    return names


@pytest.fixture(scope="module")
def sdxl_pipeline(tiny_sd):
    return StableDiffusionXLPipeline.from_pretrained(tiny_sd.sdxl_dir, local_files_only=True)


def adapted_modules(pipe) -> int:
    return sum(
        1
        for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for _, module in part.named_modules()
        if len(getattr(module, "lora_A", ())) > 0
    )


@pytest.mark.parametrize(
    "family, mode",
    [
        ("locon", "te"),  # LoCon with cached outputs (to disk): tests/test_sdxl_train_network.py
        ("lora", "cached"),  # LoRA with text encoders: tests/test_sdxl_train_network.py
        ("lilora", "te"),
        ("lilora", "cached"),
        ("lowrank_ffn", "te"),
        ("lowrank_ffn", "cached"),
    ],
)
def test_each_family_trains_with_kohyas_sdxl_keys(tiny_sd, data, sdxl_pipeline, family, mode):
    module, *args = MODULES[family]
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, "--network_module", module, *args, *MODES[mode]))
    tensors, metadata = load_lora_file(data / "out" / "tiny.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    names = {key.partition(".")[0] for key in tensors}
    if family == "lowrank_ffn":  # a replacement of the UNet's feed-forwards; text encoders have none
        assert names == kohya_sdxl_ffn_names(tiny_sd)
        assert {key.partition(".")[2] for key in tensors} == FFN_TENSORS
        return
    text_encoders = mode == "te"
    assert names == _expected_names(tiny_sd, convs=family == "locon", text_encoders=text_encoders)
    trained = {k.partition("_")[2].partition("_")[0] for k, v in tensors.items() if "lora_up" in k and v.any()}
    assert trained == ({"te1", "te2", "unet"} if text_encoders else {"unet"})
    # Plain kohya lora_down/lora_up/alpha (Light LoRA's standard form too): diffusers adapts every module.
    sdxl_pipeline.load_lora_weights(str(data / "out"), weight_name="tiny.safetensors")
    try:
        assert adapted_modules(sdxl_pipeline) == len(names)
    finally:
        sdxl_pipeline.unload_lora_weights()


@pytest.mark.parametrize("family", ["lilora", "lowrank_ffn"])
def test_resume_is_exact_for_light_lora_and_lowrank_ffn(tiny_sd, data, family):
    module, *args = MODULES[family]
    common = ("--network_module", module, *args, "--max_train_steps", "4", "--lr_scheduler", "cosine")
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, *common, "--save_every_n_steps", "2", "--save_state"))
    state = data / "out" / "tiny-step00000002-state"
    sdxl_train_network.main(sdxl_argv(tiny_sd, data, *common, "--resume", str(state), "--output_name", "resumed"))
    first = load_lora_file(data / "out" / "tiny.safetensors")[0]
    second = load_lora_file(data / "out" / "resumed.safetensors")[0]
    assert set(first) == set(second)
    assert all(torch.equal(first[key], second[key]) for key in first), family
