"""resize_lora.py --target_size/--target_ratio and several inputs: sizes, exact truncation, bad budgets."""

import pytest
import torch
from safetensors.torch import save_file

import resize_lora
from library.synthetic_lora import LoRATarget, random_lora
from networks.lora_file import load_lora_file
from tests.cli_runs import exit_status
from tests.kohya_reference import dense_delta, dense_truncation

TARGETS = [
    LoRATarget("lora_te", "text_model.encoder.layers.0.self_attn.q_proj", 64, 64),
    LoRATarget("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 96, 48),
    LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 32, 16, (3, 3), is_conv=True),
]


def run(*args) -> int:
    return exit_status(resize_lora.main, *args)


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file(random_lora(TARGETS, 16, 8, 12, 6, seed=4), path, metadata={"ss_network_dim": "16"})
    return path


@pytest.mark.parametrize("flag, value, limit", [("--target_size", "9KB", 9_000), ("--target_ratio", 0.5, None)])
def test_budget_output_fits_and_is_the_exact_truncation(flag, value, limit, lora_file, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert run("--model", lora_file, "--save_to", out, "--save_precision", "fp16", flag, value, "--verbose") == 0
    limit = limit or lora_file.stat().st_size * 0.5
    size = out.stat().st_size
    assert size <= limit and size > 0.8 * limit  # fills the budget
    resized, metadata = load_lora_file(out)
    original, _ = load_lora_file(lora_file)
    ranks = {t.name: resized[f"{t.name}.lora_down.weight"].shape[0] for t in TARGETS}
    assert len(set(ranks.values())) > 1  # chosen jointly, not one rank for all
    for target in TARGETS:
        up, down = original[f"{target.name}.lora_up.weight"], original[f"{target.name}.lora_down.weight"]
        rank = ranks[target.name]
        new_down = resized[f"{target.name}.lora_down.weight"]
        old_scale = float(original[f"{target.name}.alpha"]) / down.shape[0]
        assert float(resized[f"{target.name}.alpha"]) / rank == pytest.approx(old_scale, rel=1e-3)  # alpha / rank kept
        if rank < down.shape[0]:
            torch.testing.assert_close(
                dense_delta(resized[f"{target.name}.lora_up.weight"], new_down), dense_truncation(up, down, rank),
                rtol=2e-2, atol=2e-3,
            )  # fmt: skip
    out_text = capsys.readouterr().out
    assert "energy kept" in out_text and "of the update energy kept (exact optimum)" in out_text
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_training_comment"].startswith("Resized to fit")


@pytest.mark.parametrize("flag, value", [("--target_size", "2KB"), ("--target_ratio", 0.001)])
def test_budget_too_small_is_one_line_and_writes_nothing(flag, value, lora_file, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    listing = sorted(tmp_path.iterdir())
    assert run("--model", lora_file, "--save_to", out, flag, value) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # no progress bars
    assert len(errors) == 1 and "rank 1 in every module needs" in errors[0]
    assert sorted(tmp_path.iterdir()) == listing  # no output, no temporary file


def test_budget_with_dynamic_method_is_refused(lora_file, tmp_path, capsys):
    args = ["--dynamic_method", "sv_ratio", "--dynamic_param", 4, "--target_size", "20KB"]
    assert run("--model", lora_file, "--save_to", tmp_path / "x.safetensors", *args) == 2
    assert "drop --dynamic_method" in capsys.readouterr().err


def test_folder_of_loras_into_a_folder(lora_file, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        save_file(random_lora(TARGETS, 8, 4, 6, 3, seed=i), folder / f"lora{i}.safetensors")
    out = tmp_path / "out"
    assert run("--model", folder, "--save_to", out, "--new_rank", 3) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"lora{i}.safetensors" for i in range(3)]
    assert all(load_lora_file(p)[0][f"{TARGETS[0].name}.lora_down.weight"].shape[0] == 3 for p in out.iterdir())
    # several files, and a file name where a folder is needed
    assert run("--model", lora_file, folder / "lora0.safetensors", "--save_to", tmp_path / "two") == 0
    assert len(list((tmp_path / "two").iterdir())) == 2
    assert run("--model", folder, "--save_to", tmp_path / "one.safetensors") == 2
