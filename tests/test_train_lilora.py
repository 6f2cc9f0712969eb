"""train_network.py with --network_module networks.lilora on the tiny fixture: each init trains, files, resume."""

import pytest
from accelerate.state import AcceleratorState

import train_network
from library.errors import ConfigError
from networks import lilora_file
from networks.lora_file import load_lora_file, save_lora_file
from tests.test_train_network import base_argv, fixed_batch_loss

LILORA = ["--network_module", "networks.lilora", "--network_args", "aux_down=16", "aux_up=8"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize("init", ["up_zero", "down_zero", "joint"])
def test_each_init_lowers_the_loss_and_saves_a_kohya_lora(tiny_sd, data, init):
    argv = base_argv(
        tiny_sd, data, "--max_train_steps", "20", "--learning_rate", "4e-3"
    )  # fewer weights move: a larger lr
    train_network.main([*argv, *LILORA, f"init={init}"])
    saved = data / "out" / "tiny.safetensors"
    images = data / "img" / "10_sks toy"
    before = fixed_batch_loss(tiny_sd.sd1_dir, images)
    after = fixed_batch_loss(tiny_sd.sd1_dir, images, saved)  # read back by networks.lora
    assert after < before * 0.98, (before, after)
    metadata = load_lora_file(saved)[1]
    assert metadata["ss_network_module"] == "networks.lilora" and metadata["ss_lilora_init"] == init


def deltas(path):
    tensors = load_lora_file(path)[0]
    names = {key.partition(".")[0] for key in tensors}
    return {n: tensors[f"{n}.lora_up.weight"].flatten(1) @ tensors[f"{n}.lora_down.weight"].flatten(1) for n in names}


def test_a_compact_output_resumes_training(tiny_sd, data):
    out = data / "out"
    train_network.main([*base_argv(tiny_sd, data, "--output_name", "tiny.lilora"), *LILORA])
    assert load_lora_file(out / "tiny.lilora.safetensors")[1]["ss_lilora_format"] == "compact"
    AcceleratorState._reset_state(reset_partial_state=True)
    resume = ["--network_weights", str(out / "tiny.lilora.safetensors"), "--learning_rate", "1e-6"]
    train_network.main([*base_argv(tiny_sd, data, *resume), *LILORA])  # a tiny lr: the cores barely move
    assert load_lora_file(out / "tiny.safetensors")[1]["ss_lilora_format"] == "standard"
    trained = lilora_file.compact_to_standard(*load_lora_file(out / "tiny.lilora.safetensors"))[0]
    save_lora_file(out / "trained.safetensors", trained)
    before, after = deltas(out / "trained.safetensors"), deltas(out / "tiny.safetensors")
    moved = sum((after[n] - before[n]).norm() for n in before)
    assert moved < 0.01 * sum(delta.norm() for delta in before.values())  # it started from the trained cores


def test_both_zero_is_refused_before_anything_is_written(tiny_sd, data):
    with pytest.raises(ConfigError, match="--network_args: .*init=both_zero cannot train"):
        train_network.main([*base_argv(tiny_sd, data), *LILORA, "init=both_zero"])
    assert not (data / "out").exists() or not any((data / "out").iterdir())
