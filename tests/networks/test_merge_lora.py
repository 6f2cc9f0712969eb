"""networks/merge_lora.py end to end: LoRAs baked into the tiny SD1/SD2 checkpoints, LoRA merges, bad input."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.lora_tools import checkpoint_merge
from library.models.stable_diffusion import load_stable_diffusion
from library.synthetic_lora import LoRATarget
from networks import merge_lora
from networks.lora_file import load_lora_file
from tests.cli_runs import exit_status, heavy_imports
from tests.kohya_reference import dense_delta


def run(*args) -> int:
    return exit_status(merge_lora.main, *args)


def module_at(model, target: LoRATarget) -> torch.nn.Module:
    root = model.text_encoder if target.prefix == "lora_te" else model.unet
    return root.get_submodule(target.path)


def expected_weight(original, loras, target, dtype):
    """``W + Σ ratio * alpha / rank * up @ down`` in float64, rounded once to ``dtype``."""
    weight = module_at(original, target).weight
    total = weight.double().clone()
    for tensors, ratio in loras:
        down = tensors[f"{target.name}.lora_down.weight"]
        scale = float(tensors[f"{target.name}.alpha"]) / down.shape[0]
        total += ratio * scale * dense_delta(tensors[f"{target.name}.lora_up.weight"], down).reshape(weight.shape)
    return total.to(dtype)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_bake_into_single_file_matches_float64_reference(family, tiny_sd, tiny_targets, write_lora, tmp_path):
    targets = tiny_targets[family]
    checkpoint = tiny_sd.sd1_file if family == "sd1" else tiny_sd.sd2_file
    first, second = write_lora(targets, "a", seed=1), write_lora(targets, "b", dim=6, alpha=3.0, seed=2)
    out = tmp_path / "merged.safetensors"
    assert run("--sd_model", checkpoint, "--models", first, second, "--ratios", 0.8, -0.4, "--save_to", out) == 0
    cache = tiny_sd.tokenizer_cache_dir
    original = load_stable_diffusion(checkpoint, tokenizer_cache_dir=cache)
    merged = load_stable_diffusion(out, tokenizer_cache_dir=cache)
    loras = [(load_file(first), 0.8), (load_file(second), -0.4)]
    for target in targets:
        expected = expected_weight(original, loras, target, torch.float32)
        torch.testing.assert_close(module_at(merged, target).weight, expected, rtol=0, atol=0)
    before, after = load_file(checkpoint), load_file(out)
    assert set(before) == set(after)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert all(k.startswith("first_stage_model.") for k in before if not k.startswith(("model.", "cond_stage")))
    assert all(k in unchanged for k in before if k.startswith("first_stage_model."))  # VAE untouched
    # exactly the adapted layers changed (SD2 stores q, k and v as one OpenCLIP in_proj tensor)
    fused = sum(t.path.endswith(("k_proj", "v_proj")) for t in targets) if family == "sd2" else 0
    assert len(before) - len(unchanged) == len(targets) - fused


@pytest.mark.parametrize("block", [None, 40])
def test_bake_fp16_file_saved_as_float_rounds_once_to_float32(
    block, tiny_sd, tiny_targets, write_lora, tmp_path, monkeypatch
):
    # kohya's default for an fp16 checkpoint: bake in float32, save float32. The float32 output must be
    # the float64 sum rounded once, not the sum rounded to fp16 first and cast up. block=40 elements
    # bakes every layer in many row blocks (one row at a time where a row is longer).
    if block:
        monkeypatch.setattr(checkpoint_merge, "BLOCK_ELEMENTS", block)
    fp16_file = tmp_path / "sd1_fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(tiny_sd.sd1_file).items()}, fp16_file)
    targets = tiny_targets["sd1"]
    lora = write_lora(targets, "a", seed=4, dtype=torch.float16)
    out = tmp_path / "merged.safetensors"
    assert run("--sd_model", fp16_file, "--models", lora, "--ratios", 0.7, "--save_to", out,
               "--save_precision", "float") == 0  # fmt: skip
    cache = tiny_sd.tokenizer_cache_dir
    original, merged = (load_stable_diffusion(p, tokenizer_cache_dir=cache) for p in (fp16_file, out))
    for target in targets:
        expected = expected_weight(original, [(load_file(lora), 0.7)], target, torch.float32)
        torch.testing.assert_close(module_at(merged, target).weight, expected, rtol=0, atol=0)
    before, after = load_file(fp16_file), load_file(out)
    assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.float32}
    assert sum(not torch.equal(before[k].float(), after[k].float()) for k in before) == len(targets)


def test_bake_into_sd2_folder_with_save_precision(tiny_sd, tiny_targets, write_lora, tmp_path):
    targets = tiny_targets["sd2"]
    lora = write_lora(targets, "sd2", seed=3, dtype=torch.float16)
    out = tmp_path / "merged_sd2"
    assert run("--sd_model", tiny_sd.sd2_dir, "--models", lora, "--ratios", 1.5, "--save_to", out,
               "--save_precision", "fp16", "--v2") == 0  # fmt: skip
    original = load_stable_diffusion(tiny_sd.sd2_dir)
    merged = load_stable_diffusion(out)
    assert merged.v2
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "vae/diffusion_pytorch_model"):
        assert {v.dtype for v in load_file(out / f"{part}.safetensors").values()} == {torch.float16}
    for target in targets:
        expected = expected_weight(original, [(load_file(lora), 1.5)], target, torch.float16)
        torch.testing.assert_close(module_at(merged, target).weight, expected.float(), rtol=0, atol=0)
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "scheduler").is_dir()


def test_lora_merge_cli_writes_exact_merge_and_kohya_bytes(tiny_targets, write_lora, tmp_path):
    targets = tiny_targets["sd1"][:5]
    first, second = write_lora(targets, "a", seed=1), write_lora(targets, "b", seed=2)
    exact, kohya = tmp_path / "exact.safetensors", tmp_path / "kohya.safetensors"
    assert run("--models", first, second, "--ratios", 1, 0.5, "--save_to", exact, "--save_precision", "fp16") == 0
    assert run("--models", first, second, "--ratios", 1, 0.5, "--save_to", kohya, "--kohya_arithmetic") == 0
    exact_sd, metadata = load_lora_file(exact)
    kohya_sd, _ = load_lora_file(kohya)
    a, b = load_file(first), load_file(second)
    name = targets[0].name
    assert exact_sd[f"{name}.lora_down.weight"].dtype == torch.float16
    assert exact_sd[f"{name}.lora_down.weight"].shape[0] == 8 and kohya_sd[f"{name}.lora_down.weight"].shape[0] == 4
    assert float(kohya_sd[f"{name}.alpha"]) == float(a[f"{name}.alpha"])
    # kohya: (up_a + 0.5 up_b) @ (down_a + 0.5 down_b) * alpha / rank, in float32
    up = a[f"{name}.lora_up.weight"] + 0.5 * b[f"{name}.lora_up.weight"]
    down = a[f"{name}.lora_down.weight"] + 0.5 * b[f"{name}.lora_down.weight"]
    torch.testing.assert_close(kohya_sd[f"{name}.lora_up.weight"], up, rtol=0, atol=0)
    torch.testing.assert_close(kohya_sd[f"{name}.lora_down.weight"], down, rtol=0, atol=0)
    assert metadata["sshs_model_hash"] and metadata["ss_network_dim"] == "8"


def test_lora_merges_and_help_do_not_import_the_model_libraries(tiny_targets, write_lora, tmp_path):
    """Only a checkpoint bake needs diffusers and transformers (3-4 s to import); merging LoRAs into a
    LoRA, the SVD merge and --help answer without them."""
    targets = tiny_targets["sd1"][:2]
    first, second = str(write_lora(targets, "a", seed=1)), str(write_lora(targets, "b", seed=2))
    runs = [
        ["networks/merge_lora.py", "--models", first, second, "--save_to", str(tmp_path / "ab.safetensors")],
        [
            "networks/svd_merge_lora.py",
            "--models",
            first,
            second,
            "--new_rank",
            "2",
            "--save_to",
            str(tmp_path / "ab2.safetensors"),
        ],  # fmt: skip
        ["networks/merge_lora.py", "--help"],
        ["networks/svd_merge_lora.py", "--help"],
    ]
    for argv in runs:
        assert {"diffusers", "transformers"}.isdisjoint(heavy_imports(*argv)), argv
    assert (tmp_path / "ab.safetensors").is_file() and (tmp_path / "ab2.safetensors").is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("ratios", "--ratios has 2 values for 1 --models"),
        ("other_model", "is for another model"),
        ("unknown_keys", "match no layer of the SD1 model"),
        ("families", "different model families"),
        ("widths", "the LoRAs are for different models"),
        ("glora", "is a GLoRA module"),
        ("full_diff", "is a LyCORIS full module"),
        ("glora_bake", "is a GLoRA module"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, message, tiny_sd, tiny_targets, write_lora, tmp_path, capsys):
    sd1 = tiny_targets["sd1"]
    args = ["--sd_model", tiny_sd.sd1_file]
    if case == "ratios":
        args += ["--models", write_lora(sd1, "a"), "--ratios", 1, 1]
    elif case == "other_model":
        args += ["--models", write_lora(tiny_targets["sd2"], "sd2")]
    elif case == "unknown_keys":
        args += ["--models", write_lora([LoRATarget("lora_unet", "input_blocks.1.1.proj_in", 8, 8)], "sdxl_like")]
    elif case == "widths":  # SD1 and SD2 LoRAs without metadata: same module names, other layer widths
        args = ["--models", write_lora(sd1, "a"), write_lora(tiny_targets["sd2"], "b")]
    elif case in ("glora", "full_diff", "glora_bake"):
        odd = tmp_path / f"{case}.safetensors"
        if case == "full_diff":
            save_file({"lora_unet_x.diff": torch.zeros(8, 8)}, odd)
        else:
            save_file({f"lora_unet_x.{n}.weight": torch.zeros(2, 2) for n in ("a1", "a2", "b1", "b2")}, odd)
        models = ["--models", write_lora(sd1, "a"), odd]
        args = [*args, *models] if case == "glora_bake" else models
    else:
        one = write_lora(sd1, "a", metadata={"ss_base_model_version": "sd_v1"})
        two = write_lora(sd1, "b", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
        args = ["--models", one, two]
    out = tmp_path / "out.safetensors"
    assert run(*args, "--save_to", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
