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


@pytest.mark.parametrize(
    "case, message",
    [
        ("ratios", "--ratios has 1 values for 2 --models"),
        ("families", "the LoRAs are for different model families"),
        ("widths", "the LoRAs are for different models"),
        ("glora", "is a GLoRA module"),
        ("full_diff", "is a LyCORIS full module"),
        ("nan", "has NaN or infinite weights"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, message, loras, tmp_path, capsys):
    models, extra = list(loras), []
    if case == "ratios":
        extra = ["--ratios", 1]
    elif case == "families":
        tensors = load_file(loras[1])
        save_file(tensors, loras[1], metadata={"ss_base_model_version": "sdxl_base_v1-0"})
        save_file(load_file(loras[0]), loras[0], metadata={"ss_base_model_version": "sd_v1"})
    elif case == "widths":  # a LoRA for another model: the same module names, other layer widths
        wider = [LoRATarget(t.prefix, t.path, t.out_features * 2, t.in_features, t.kernel_size, t.is_conv)
                 for t in TARGETS]  # fmt: skip
        save_file(random_lora(wider, 4, 2.0, 4, 1.0, seed=5, dtype=torch.float32), loras[1])
    elif case == "nan":
        tensors = load_file(loras[1])
        tensors[f"{TARGETS[0].name}.lora_up.weight"][0, 0] = float("nan")
        save_file(tensors, loras[1])
    else:
        odd = {"lora_unet_x.diff": torch.zeros(8, 8)} if case == "full_diff" else {
            f"lora_unet_x.{n}.weight": torch.zeros(2, 2) for n in ("a1", "a2", "b1", "b2")}  # fmt: skip
        save_file(odd, loras[1])
    out = tmp_path / "out.safetensors"
    listing = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert run("--models", *models, *extra, "--save_to", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == listing  # nothing written, no temp file
