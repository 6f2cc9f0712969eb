"""A config written as the kohya_ss GUI writes it, launched as the GUI launches it, trains and saves."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from networks.lora_file import load_lora_file

REPO = Path(__file__).resolve().parents[1]
GUI_CONFIG = REPO / "tests" / "fixtures" / "kohya_gui" / "config_lora-EDG_LoraOptiSettings.toml"
# class_accelerate_launch.AccelerateLaunch.run_cmd's order and the GUI's default values.
GUI_LAUNCH = ["--dynamo_backend", "no", "--dynamo_mode", "default", "--mixed_precision", "bf16",
              "--num_processes", "1", "--num_machines", "1", "--num_cpu_threads_per_process", "2"]  # fmt: skip


@pytest.mark.slow
def test_gui_config_trains_and_saves_under_accelerate_launch(tiny_sd, data):
    config = data / "config_lora-20260101-120000.toml"
    text = GUI_CONFIG.read_text()
    for placeholder, value in {
        "{MODEL}": tiny_sd.sd1_dir,
        "{TRAIN_DATA_DIR}": data / "img",
        "{OUTPUT_DIR}": data / "out",
    }.items():
        text = text.replace(placeholder, str(value))
    config.write_text(text)
    launch = [sys.executable, "-m", "accelerate.commands.launch", *GUI_LAUNCH]
    result = subprocess.run(
        [*launch, "train_network.py", "--config_file", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [line for line in result.stderr.splitlines() if "deprecated" in line]  # e.g. transformers' torch_dtype
    ignored = [line for line in result.stderr.splitlines() if "ignoring keys" in line]
    assert len(ignored) == 1 and ignored[0].endswith(
        "ignoring keys that no flag of this script knows: epoch, noise_offset_type (did you mean noise_offset?)"
    )
    tensors, metadata = load_lora_file(data / "out" / "last.safetensors")
    assert metadata["ss_network_dim"] == "64" and metadata["ss_network_alpha"] == "64.0"
    assert metadata["ss_mixed_precision"] == "bf16" and metadata["ss_max_train_steps"] == "2"
    assert metadata["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}  # save_precision bf16
    trained_ups = [k for k, t in tensors.items() if k.endswith("lora_up.weight") and t.abs().sum() > 0]
    assert any(k.startswith("lora_unet_") for k in trained_ups) and any(k.startswith("lora_te_") for k in trained_ups)
