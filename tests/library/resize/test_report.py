"""The --sweep preview against real resizes, size estimates against real files, the verbose table."""

import statistics

import pytest
import torch
from safetensors.torch import save_file

from library.errors import ConfigError
from library.resize.rank_reduction import (
    ResizeRequest,
    linear_alpha,
    module_spectra,
    resize_state_dict,
    resized_metadata,
)
from library.resize.report import (
    format_size,
    module_table,
    rank_histogram,
    safetensors_size,
    summary,
    sweep_requests,
    sweep_row,
)
from library.synthetic_lora import LoRATarget, random_lora
from networks.lora_file import save_lora_file

TARGETS = [
    LoRATarget("lora_te", "text_model.encoder.layers.0.self_attn.q_proj", 64, 64),
    LoRATarget("lora_unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 96, 48),
    LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 24, 16, (3, 3), is_conv=True),
]
METADATA = {"ss_network_dim": "16", "ss_training_comment": "a long comment " * 20, "modelspec.title": "x"}


@pytest.fixture(scope="module")
def lora():
    return random_lora(TARGETS, dim=16, alpha=8, conv_dim=12, conv_alpha=4, decay=0.7, seed=5)


def test_size_estimate_is_the_real_file_size(tmp_path):
    tensors = {
        "b": torch.zeros(3, 5, dtype=torch.float16),
        "a": torch.zeros(7, dtype=torch.bfloat16),
        "n": torch.arange(3),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata=METADATA)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    assert safetensors_size(specs, METADATA) == (tmp_path / "x.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("request_", "values"),
    [
        (ResizeRequest(new_rank=12, dynamic_method="sv_ratio", dynamic_param=1), [2, 4, 8, 1000]),
        (ResizeRequest(new_rank=16, dynamic_method="sv_fro", dynamic_param=1), [0.5, 0.9, 0.99]),
        (ResizeRequest(), [1, 4, 10]),
    ],
)
def test_sweep_rows_predict_real_resizes(tmp_path, lora, request_, values):
    spectra = module_spectra(lora, "x")
    for request, value in zip(sweep_requests(request_, values), values):
        row = sweep_row(spectra, request, value, {}, METADATA, torch.float16)
        result = resize_state_dict(lora, request, save_dtype=torch.float16)
        path = tmp_path / f"{value}.safetensors"
        metadata = resized_metadata(METADATA, request, result.max_old_rank, linear_alpha(result.modules))
        save_lora_file(path, result.state_dict, metadata)
        assert row.ranks == [m.choice.rank for m in result.modules]
        fro = [m.retention.fro_retained for m in result.modules]
        assert (row.mean_fro, row.min_fro) == pytest.approx((statistics.fmean(fro), min(fro)))
        assert row.size == path.stat().st_size


def test_sweep_values_are_ranks_without_a_dynamic_method():
    assert [r.new_rank for r in sweep_requests(ResizeRequest(new_conv_rank=3), [8, 2])] == [8, 2]
    with pytest.raises(ConfigError, match="--sweep values are ranks .* whole numbers"):
        sweep_requests(ResizeRequest(), [0.5])


def test_rank_histogram_bins_by_powers_of_two():
    assert rank_histogram([1, 2, 3, 4, 5, 8, 9, 300]) == "1:1 2:1 3-4:2 5-8:2 9-16:1 257-512:1"


def test_format_size():
    assert (format_size(512), format_size(30_900_000), format_size(1_245_000_000)) == ("512 B", "29.5 MiB", "1.16 GiB")


def test_verbose_table_and_summary(lora):
    request = ResizeRequest(new_rank=64, new_conv_rank=4, dynamic_method="sv_ratio", dynamic_param=1e6)
    modules = resize_state_dict(lora, request).modules
    table = module_table(modules).splitlines()
    assert table[0].split()[:4] == ["module", "old", "new", "alpha"]
    q_row = table[1].split()
    assert q_row[:4] == [TARGETS[0].name, "16", "16", "8"] and "kohya's rule: 17" in table[1]
    conv_row = table[3].split()
    assert conv_row[:4] == [TARGETS[2].name, "12", "4", f"{4 / 12 * 4:g}"]  # alpha / rank kept
    text = summary(modules, 2048)
    assert text.startswith("Average Frobenius norm retention: ")
    assert "output: 2 KiB, 3 modules, ranks 3-4:1 9-16:2" in text
