"""``python networks/lilora.py --to_lora IN OUT``, run from the repo root exactly as users type it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library.models.stable_diffusion import load_stable_diffusion
from networks import lilora
from networks.lora_file import load_lora_file

REPO = Path(__file__).resolve().parents[1]


def to_lora(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell: the repo is not installed
    command = [sys.executable, "networks/lilora.py", "--to_lora", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def saved(tiny_sd, tmp_path_factory):
    """One trained text-encoder network saved compact and standard (float32: the conversion is then bit-exact)."""
    folder = tmp_path_factory.mktemp("cli")
    model = load_stable_diffusion(tiny_sd.sd1_dir)
    network = lilora.create_network(1.0, 4, 2, None, model.text_encoder, None, aux_down="16", aux_up="8")
    with torch.no_grad():
        for param in network.parameters():
            param.normal_(0, 0.1)
    for name in ("x.lilora.safetensors", "x.safetensors"):
        network.save_weights(folder / name, torch.float32, {"ss_output_name": "x"})
    return folder


def test_to_lora_writes_the_standard_file(saved):
    result = to_lora(str(saved / "x.lilora.safetensors"), str(saved / "converted.safetensors"))
    assert result.returncode == 0, result.stderr
    converted, converted_metadata = load_lora_file(saved / "converted.safetensors")
    standard, standard_metadata = load_lora_file(saved / "x.safetensors")
    assert converted.keys() == standard.keys() and all(torch.equal(converted[k], v) for k, v in standard.items())
    assert converted_metadata == standard_metadata


def test_to_lora_refuses_a_standard_input_in_one_line(saved):
    result = to_lora(str(saved / "x.safetensors"), str(saved / "out.safetensors"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: '{saved / 'x.safetensors'}' holds no Light LoRA cores: it is already a standard file"
    ]
    assert not (saved / "out.safetensors").exists()
