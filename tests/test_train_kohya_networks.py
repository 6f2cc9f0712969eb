"""train_network.py with kohya's other network modules, ``networks.dylora`` and ``networks.lora_fa``, on tiny SD1."""

import json

import pytest
import torch

import train_network
from library.models.stable_diffusion import load_stable_diffusion
from networks import dylora, lora
from networks.lora_file import load_lora_file
from tests.test_train_network import base_argv

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_dylora_trains_whole_unit_slices_and_saves_kohyas_file(tiny_sd, data):
    args = ("--network_module", "networks.dylora", "--network_dim", "8", "--network_args", "unit=2", "conv_dim=4")
    train_network.main(base_argv(tiny_sd, data, *args, "--max_train_steps", "2"))
    tensors, metadata = load_lora_file(data / "out" / "tiny.safetensors")

    model = load_stable_diffusion(tiny_sd.sd1_dir)
    built = dylora.create_network(1.0, 8, 4, None, model.text_encoder, model.unet, unit="2", conv_dim="4")
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert metadata["ss_network_module"] == "networks.dylora" and metadata["ss_network_dim"] == "8"
    assert json.loads(metadata["ss_network_args"]) == {"unit": "2", "conv_dim": "4", "conv_alpha": "1.0"}
    # lora_up starts at zero: its non-zero columns are the slices trained, one unit-aligned pair per step
    for key, up in tensors.items():
        if key.endswith("lora_up.weight"):
            trained = {column for column in range(up.shape[1]) if up[:, column].any()}
            assert trained and len(trained) <= 2 * 2, key
            assert all(column ^ 1 in trained for column in trained), key  # whole slices {0,1}, {2,3}, ...

    # the file is a plain LoRA file
    path = data / "out" / "tiny.safetensors"
    network, weights = lora.create_network_from_weights(1.0, path, None, model.text_encoder, model.unet)
    assert not network.load_state_dict(weights, strict=True).missing_keys


def test_lora_fa_trains_only_lora_up_and_resumes_its_frozen_down(tiny_sd, data):
    args = ("--network_module", "networks.lora_fa", "--network_args", "conv_dim=2")
    train_network.main(base_argv(tiny_sd, data, *args, "--max_train_steps", "1", "--output_name", "init"))
    init = data / "out" / "init.safetensors"
    train_network.main(base_argv(tiny_sd, data, *args, "--network_weights", str(init), "--max_train_steps", "3"))
    before, _ = load_lora_file(init)
    after, metadata = load_lora_file(data / "out" / "tiny.safetensors")
    assert before.keys() == after.keys() and metadata["ss_network_module"] == "networks.lora_fa"
    for key, value in after.items():
        if key.endswith("lora_down.weight"):
            assert torch.equal(value, before[key]), key  # frozen: bit for bit, through save and resume
        elif key.endswith("lora_up.weight"):
            assert before[key].any() and not torch.equal(value, before[key]), key


def test_dylora_resumes_with_the_same_rank_draws(tiny_sd, data):
    # 60 images at batch 6: 10 steps per epoch; the state is saved at step 2 and the run goes on to step 4.
    common = ("--network_module", "networks.dylora", "--network_dim", "4", "--network_args", "unit=1",
              "--train_batch_size", "6", "--max_train_steps", "4")  # fmt: skip
    train_network.main(base_argv(tiny_sd, data, *common, "--save_every_n_steps", "2", "--save_state"))
    resumed = ("--resume", str(data / "out" / "tiny-step00000002-state"), "--output_name", "resumed")
    train_network.main(base_argv(tiny_sd, data, *common, *resumed))
    uninterrupted, _ = load_lora_file(data / "out" / "tiny.safetensors")
    again, _ = load_lora_file(data / "out" / "resumed.safetensors")
    assert all(torch.equal(again[key], value) for key, value in uninterrupted.items())
