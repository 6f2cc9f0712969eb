"""The exact LoRA merge against dense float64 sums, and kohya's arithmetic against its formulas."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import ConfigError
from library.lora_tools.lora_merge import exact_merge, kohya_merge, merged_metadata, merged_state_dict
from library.lora_tools.lora_sets import modules_of, read_loras
from library.synthetic_lora import LoRATarget, random_lora
from tests.kohya_reference import dense_delta

LINEAR = LoRATarget("lora_unet", "down_blocks.0.attentions.0.proj_in", 24, 16)
CONV = LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 12, 8, (3, 3), is_conv=True)
ONLY_FIRST = LoRATarget("lora_te", "text_model.encoder.layers.0.mlp.fc1", 20, 10)


def lora(path, targets, dim, alpha, seed, metadata=None):
    save_file(
        random_lora(targets, dim, alpha, dim - 1, alpha / 2, seed=seed, dtype=torch.float32), path, metadata=metadata
    )
    return str(path)


def update(tensors, name):
    """``alpha / rank * up @ down`` of a module in float64."""
    down = tensors[f"{name}.lora_down.weight"]
    return dense_delta(tensors[f"{name}.lora_up.weight"], down) * float(tensors[f"{name}.alpha"]) / down.shape[0]


@pytest.fixture
def two_loras(tmp_path):
    first = lora(tmp_path / "a.safetensors", [LINEAR, CONV, ONLY_FIRST], 4, 2.0, seed=1)
    second = lora(tmp_path / "b.safetensors", [LINEAR, CONV], 6, 5.0, seed=2)
    return first, second


def test_exact_merge_is_the_sum_of_the_scaled_updates(two_loras):
    inputs, ratios = read_loras(list(two_loras), [0.7, -1.3])
    merged = merged_state_dict(exact_merge(inputs, ratios), torch.float64)
    a, b = (load_file(p) for p in two_loras)
    for target in (LINEAR, CONV):
        expected = 0.7 * update(a, target.name) - 1.3 * update(b, target.name)
        torch.testing.assert_close(update(merged, target.name), expected, rtol=1e-12, atol=1e-14)
        assert (
            merged[f"{target.name}.lora_down.weight"].shape[0]
            == a[f"{target.name}.lora_down.weight"].shape[0] + b[f"{target.name}.lora_down.weight"].shape[0]
        )
    assert merged[f"{CONV.name}.lora_down.weight"].shape[1:] == (8, 3, 3)
    assert merged[f"{CONV.name}.lora_up.weight"].shape[2:] == (1, 1)
    torch.testing.assert_close(update(merged, ONLY_FIRST.name), 0.7 * update(a, ONLY_FIRST.name), rtol=1e-12, atol=0)


def test_shuffle_permutes_ranks_but_keeps_the_update(two_loras):
    inputs, ratios = read_loras(list(two_loras), [1.0, 0.5])
    plain = merged_state_dict(exact_merge(inputs, ratios), torch.float64)
    shuffled = merged_state_dict(exact_merge(inputs, ratios, shuffle_seed=3), torch.float64)
    key = f"{LINEAR.name}.lora_down.weight"
    assert not torch.equal(plain[key], shuffled[key])
    torch.testing.assert_close(update(shuffled, LINEAR.name), update(plain, LINEAR.name), rtol=1e-12, atol=1e-14)


def test_zero_ratio_parts_are_left_out(two_loras):
    inputs, _ = read_loras(list(two_loras), None)
    merged = merged_state_dict(exact_merge(inputs, [0.0, 1.0]), torch.float32)
    assert merged[f"{LINEAR.name}.lora_down.weight"].shape[0] == 6
    assert f"{ONLY_FIRST.name}.alpha" not in merged


def test_kohya_arithmetic_matches_its_formulas(two_loras, tmp_path):
    # one model, ratio 0.5: kohya scales up by |0.5| and down by 0.5, so the update is 0.25 of it
    single, _ = read_loras([two_loras[0]], [0.5])
    out = merged_state_dict(kohya_merge(single, [0.5], torch.float64), torch.float64)
    a = load_file(two_loras[0])
    torch.testing.assert_close(update(out, LINEAR.name), 0.25 * update(a, LINEAR.name), rtol=1e-6, atol=1e-9)
    # --concat: every part ends up divided by the summed rank (alpha of the first file)
    inputs, ratios = read_loras(list(two_loras), [1.0, 2.0])
    b = load_file(two_loras[1])
    out = merged_state_dict(kohya_merge(inputs, ratios, torch.float64, concat=True), torch.float64)
    name = LINEAR.name
    parts = [(a, 1.0, 4), (b, 2.0, 6)]
    expected = sum(
        r
        * abs(r)
        * float(t[f"{name}.alpha"])
        / 10
        * dense_delta(t[f"{name}.lora_up.weight"], t[f"{name}.lora_down.weight"])
        for t, r, _ in parts
    )
    torch.testing.assert_close(update(out, name), expected, rtol=1e-6, atol=1e-9)


def test_kohya_sum_of_factors_has_cross_terms(tmp_path):
    paths = [lora(tmp_path / f"{i}.safetensors", [LINEAR], 4, 4.0, seed=i) for i in range(2)]
    inputs, ratios = read_loras(paths, [1.0, 1.0])
    out = merged_state_dict(kohya_merge(inputs, ratios, torch.float64), torch.float64)
    a, b = (load_file(p) for p in paths)
    name = LINEAR.name
    up = a[f"{name}.lora_up.weight"].double() + b[f"{name}.lora_up.weight"].double()
    down = a[f"{name}.lora_down.weight"].double() + b[f"{name}.lora_down.weight"].double()
    torch.testing.assert_close(update(out, name), up @ down, rtol=1e-6, atol=1e-9)
    exact = merged_state_dict(exact_merge(inputs, ratios), torch.float64)
    assert not torch.allclose(update(out, name), update(exact, name), rtol=1e-3)


def test_kohya_sum_needs_equal_ranks(two_loras):
    inputs, ratios = read_loras(list(two_loras), [1.0, 1.0])
    with pytest.raises(ConfigError, match="ranks 4 and 6 differ"):
        kohya_merge(inputs, ratios)


def test_ratio_count_and_families_are_checked(tmp_path, two_loras):
    with pytest.raises(ConfigError, match="--ratios has 1 values for 2 --models"):
        read_loras(list(two_loras), [1.0])
    sd1 = lora(tmp_path / "sd1.safetensors", [LINEAR], 4, 4.0, 0, {"ss_base_model_version": "sd_v1"})
    sd2 = lora(tmp_path / "sd2.safetensors", [LINEAR], 4, 4.0, 1, {"ss_base_model_version": "sd_v2_v"})
    with pytest.raises(ConfigError, match="different model families"):
        read_loras([sd1, sd2], None)
    wide = LoRATarget(LINEAR.prefix, LINEAR.path, 32, 16)
    other = lora(tmp_path / "wide.safetensors", [wide], 4, 4.0, 2)
    with pytest.raises(ConfigError, match="for different models"):
        read_loras([sd1, other], None)


def test_metadata_keeps_the_version_and_marks_dynamic_dims(two_loras):
    inputs, ratios = read_loras(list(two_loras), [1.0, 1.0])
    inputs[1].metadata["ss_base_model_version"] = "sd_v1"
    metadata = merged_metadata(inputs, ratios, exact_merge(inputs, ratios))
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "Dynamic"
    assert metadata["ss_training_comment"] == "merged from a.safetensors (1), b.safetensors (1)"
    modules, others = modules_of(
        {"x.lora_down.weight": torch.ones(2, 3), "x.lora_up.weight": torch.ones(4, 2), "emb": torch.ones(1)}, "f"
    )
    assert list(modules) == ["x"] and others == ["emb"]
