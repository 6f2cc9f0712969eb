"""networks/check_lora_weights.py and tools/show_metadata.py: kohya's output, hashes verified, module summary."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from library.lora_tools.inspection import update_norm
from library.lora_tools.lora_sets import modules_of
from library.synthetic_lora import LoRATarget, random_lora
from networks import check_lora_weights
from networks.lora_file import save_lora_file
from tests.cli_runs import exit_status
from tests.kohya_reference import dense_delta

REPO = Path(__file__).resolve().parents[2]
TARGETS = [
    LoRATarget("lora_te", "text_model.encoder.layers.0.mlp.fc1", 24, 16),
    LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 12, 8, (3, 3), is_conv=True),
]


def show_metadata():
    spec = importlib.util.spec_from_file_location("show_metadata", REPO / "tools" / "show_metadata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(main, *args) -> int:
    return exit_status(main, *args)


@pytest.fixture
def lora_file(tmp_path):
    tensors = random_lora(TARGETS, 4, 2.0, 3, 1.5, seed=1, dtype=torch.float32)
    tensors[f"{TARGETS[0].name}.lora_up.weight"].zero_()  # an untrained module
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, tensors, {"ss_network_dim": "4", "ss_output_name": "lora"})
    return path, tensors


def test_update_norm_is_the_dense_frobenius_norm():
    tensors = random_lora(TARGETS, 5, 3.0, 4, 1.0, seed=2, dtype=torch.float32)
    modules, _ = modules_of(tensors, "lora")
    for target in TARGETS:
        down = tensors[f"{target.name}.lora_down.weight"]
        scale = float(tensors[f"{target.name}.alpha"]) / down.shape[0]
        dense = torch.linalg.matrix_norm(dense_delta(tensors[f"{target.name}.lora_up.weight"], down)) * scale
        assert math.isclose(update_norm(modules[target.name]), float(dense), rel_tol=1e-10)


def test_check_lora_weights_prints_kohya_lines_summary_and_hashes(lora_file, capsys):
    path, tensors = lora_file
    assert run(check_lora_weights.main, path) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "number of LoRA modules: 4"
    up_key = f"{TARGETS[0].name}.lora_up.weight"
    assert f"{up_key},(24-4),0.0,0.0" in out
    conv_line = next(line for line in out if line.startswith(TARGETS[1].name + " "))
    assert conv_line.split()[1:4] == ["conv3x3", "3", "1.5"]
    first_line = next(line for line in out if line.startswith(TARGETS[0].name + " "))
    assert first_line.endswith("zero update (untrained?)")
    assert out[-1] == "sshs hashes: model ok, legacy ok"


def test_stale_hash_is_reported(lora_file, tmp_path, capsys):
    _, tensors = lora_file
    stale = tmp_path / "stale.safetensors"
    save_file(tensors, stale, metadata={"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "e3b0c442"})
    assert run(check_lora_weights.main, stale, "-s") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("sshs hashes: model MISMATCH (file 0000") and last.endswith("legacy ok")


def test_show_metadata_prints_json_and_checks_hashes(lora_file, capsys):
    path, _ = lora_file
    assert run(show_metadata().main, "--model", path, "--summary") == 0
    captured = capsys.readouterr()
    metadata = json.loads(captured.out)
    assert metadata["ss_output_name"] == "lora" and len(metadata["sshs_model_hash"]) == 64
    assert "sshs hashes: model ok, legacy ok" in captured.err and "2 modules, ranks 3, 4; 1 zero" in captured.err


def test_missing_file_is_one_line(tmp_path, capsys):
    assert run(check_lora_weights.main, tmp_path / "nope.safetensors") == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
