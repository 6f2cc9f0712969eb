"""networks/extract_lora_from_models.py on the tiny models: a baked-in LoRA comes back, kohya's keys, bad input."""

import pytest
import torch
from safetensors.torch import load_file

from networks import extract_lora_from_models, merge_lora
from networks.lora_file import load_lora_file
from tests.cli_runs import exit_status, heavy_imports
from tests.kohya_reference import dense_delta


def run(script, *args) -> int:
    return exit_status(script.main, *args)


def update(tensors, name):
    down = tensors[f"{name}.lora_down.weight"]
    return dense_delta(tensors[f"{name}.lora_up.weight"], down) * float(tensors[f"{name}.alpha"]) / down.shape[0]


@pytest.fixture
def tuned(tiny_sd, tiny_targets, write_lora, tmp_path):
    """The tiny SD1 file with a rank-2 LoCon baked in (its update is what extraction must find)."""
    lora = write_lora(tiny_targets["sd1"], "baked", dim=2, alpha=2.0, conv_dim=2, conv_alpha=2.0, seed=5)
    out = tmp_path / "tuned.safetensors"
    assert run(merge_lora, "--sd_model", tiny_sd.sd1_file, "--models", lora, "--ratios", 30, "--save_to", out) == 0
    return out, load_file(lora)


def test_extraction_recovers_the_baked_update(tiny_sd, tiny_targets, tuned, tmp_path):
    tuned_file, baked = tuned
    out = tmp_path / "extracted.safetensors"
    assert run(extract_lora_from_models, "--model_org", tiny_sd.sd1_file, "--model_tuned", tuned_file,
               "--dim", 2, "--conv_dim", 2, "--clamp_quantile", 1, "--save_to", out) == 0  # fmt: skip
    extracted, metadata = load_lora_file(out)
    assert set(extracted) == set(baked)  # kohya's LoCon key names, text encoder included
    for target in tiny_targets["sd1"]:
        assert extracted[f"{target.name}.lora_down.weight"].shape == baked[f"{target.name}.lora_down.weight"].shape
        assert float(extracted[f"{target.name}.alpha"]) == 2.0
        expected = 30 * update(baked, target.name)
        # the tuned weights are float32: the difference carries float32 rounding of the base weights
        torch.testing.assert_close(update(extracted, target.name), expected, rtol=1e-4, atol=1e-5)
    assert metadata["ss_network_dim"] == "2" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2.0"}'


def test_unchanged_text_encoder_and_no_conv_dim(tiny_sd, tiny_targets, tuned, tmp_path):
    tuned_file, _ = tuned
    out = tmp_path / "unet_only.safetensors"
    assert run(extract_lora_from_models, "--model_org", tiny_sd.sd1_file, "--model_tuned", tuned_file,
               "--dim", 3, "--min_diff", 1e6, "--save_to", out, "--save_precision", "fp16") == 0  # fmt: skip
    extracted, _ = load_lora_file(out)
    names = {key.rsplit(".", 2)[0] for key in extracted}
    assert not any(name.startswith("lora_te_") for name in names)
    expected = {t.name for t in tiny_targets["sd1"] if t.prefix == "lora_unet" and ".attentions." in t.path}
    assert names == expected and {v.dtype for v in extracted.values()} == {torch.float16}


@pytest.mark.parametrize("case", ["families", "sdxl"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_sd, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    extra = ["--sdxl"] if case == "sdxl" else []
    tuned = tiny_sd.sd2_file if case == "families" else tiny_sd.sd1_file
    assert run(extract_lora_from_models, "--model_org", tiny_sd.sd1_file, "--model_tuned", tuned, "--save_to", out,
               *extra) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("SD1" in err[0] and "SD2" in err[0] if case == "families" else "SDXL" in err[0])
    assert not out.exists()


def test_help_answers_before_the_model_libraries_import():
    """torch, diffusers and transformers take 4-5 s to import; --help needs none of them."""
    assert heavy_imports("networks/extract_lora_from_models.py", "--help") == []
