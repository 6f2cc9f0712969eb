"""networks/svd_merge_lora.py: the best rank-k approximation of the exact sum, kohya's ranks, closer than kohya."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.synthetic_lora import LoRATarget, random_lora
from networks import svd_merge_lora
from networks.lora_file import load_lora_file
from tests.cli_runs import exit_status
from tests.kohya_reference import dense_delta, kohya_rank, kohya_svd_merge

TARGETS = [
    LoRATarget("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 24, 16),
    LoRATarget("lora_unet", "down_blocks.0.attentions.0.proj_in", 16, 16, (1, 1), is_conv=True),
    LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 12, 8, (3, 3), is_conv=True),
]


def run(*args) -> int:
    return exit_status(svd_merge_lora.main, *args)


@pytest.fixture
def loras(tmp_path):
    paths = []
    for i, (dim, alpha) in enumerate([(4, 2.0), (6, 6.0)]):
        path = tmp_path / f"{i}.safetensors"
        save_file(random_lora(TARGETS, dim, alpha, dim, alpha / 2, seed=i, dtype=torch.float32), path)
        paths.append(path)
    return paths


def exact_sum(paths, ratios, name):
    total = 0
    for path, ratio in zip(paths, ratios):
        tensors = load_file(path)
        down = tensors[f"{name}.lora_down.weight"]
        total = total + ratio * float(tensors[f"{name}.alpha"]) / down.shape[0] * dense_delta(
            tensors[f"{name}.lora_up.weight"], down
        )
    return total


def kohya_parts(paths, ratios, name):
    parts = []
    for path, ratio in zip(paths, ratios):
        t = load_file(path)
        parts.append((ratio, t[f"{name}.lora_up.weight"], t[f"{name}.lora_down.weight"], float(t[f"{name}.alpha"])))
    return parts


def test_best_truncation_of_the_exact_sum_with_kohyas_ranks(loras, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    ratios = [0.9, -0.6]
    assert run("--models", *loras, "--ratios", *ratios, "--new_rank", 3, "--new_conv_rank", 2, "--save_to", out) == 0
    merged, metadata = load_lora_file(out)
    for target in TARGETS:
        name = target.name
        down, up = merged[f"{name}.lora_down.weight"], merged[f"{name}.lora_up.weight"]
        rank = 2 if target.kernel_size == (3, 3) else 3  # kohya: --new_conv_rank for 3x3 convs only
        assert down.shape[0] == rank and float(merged[f"{name}.alpha"]) == rank
        ours = dense_delta(up, down)
        exact = exact_sum(loras, ratios, name)
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(ours, best, rtol=1e-5, atol=1e-6)  # float32 output
        kohya_up, kohya_down = kohya_svd_merge(kohya_parts(loras, ratios, name), rank)
        kohya = dense_delta(kohya_up, kohya_down)
        assert torch.linalg.norm(ours - exact) < torch.linalg.norm(kohya - exact)
    assert metadata["ss_network_dim"] == "3" and '"conv_dim": 2' in metadata["ss_network_args"]
    assert "Average Frobenius norm retention" in capsys.readouterr().out


def test_dynamic_method_picks_kohyas_rank_of_the_sum(loras, tmp_path):
    out = tmp_path / "dynamic.safetensors"
    assert run("--models", *loras, "--new_rank", 16, "--dynamic_method", "sv_fro", "--dynamic_param", 0.9,
               "--save_to", out) == 0  # fmt: skip
    merged, metadata = load_lora_file(out)
    for target in TARGETS:
        exact = exact_sum(loras, [1.0, 1.0], target.name)
        spectrum = torch.linalg.svdvals(exact)
        expected = min(kohya_rank(spectrum, "sv_fro", 0.9, 16), 10)  # at most the merged rank 4 + 6
        assert merged[f"{target.name}.lora_down.weight"].shape[0] == expected
    assert metadata["ss_network_dim"] == "Dynamic"


def test_ratio_count_mismatch_writes_nothing(loras, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert run("--models", *loras, "--ratios", 1, "--save_to", out) == 2
    assert "--ratios has 1 values for 2 --models" in capsys.readouterr().err and not out.exists()
