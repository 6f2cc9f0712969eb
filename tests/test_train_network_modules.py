"""One optimizer step trains exactly the modules kohya trains, in every mode that changes which or how.

The expected modules come from kohya's naming rule applied to the tiny model's own layers
(tests/kohya_reference.py), not from the network: a module the network forgot to patch, or one
that is patched but gets no gradient (as the text encoder's LoRA once did under gradient
checkpointing), fails here. LoRA's up weights start at zero and AdamW moves a weight by about the
learning rate whatever the size of its gradient, so after one step a module trained iff its up
weight is non-zero.
"""

import pytest
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

import train_network
from networks.lora_file import load_lora_file
from tests.kohya_reference import kohya_module_names
from tests.test_train_network import base_argv

pytestmark = [pytest.mark.usefixtures("fresh_accelerate_state"), pytest.mark.slow]

MODES = {
    "plain": ((), True, True, False),
    "gradient_checkpointing": (("--gradient_checkpointing",), True, True, False),
    "unet_only": (("--network_train_unet_only",), False, True, False),
    "text_encoder_only": (("--network_train_text_encoder_only",), True, False, False),
    "bf16": (("--mixed_precision", "bf16"), True, True, False),
    "locon_checkpointing": (("--network_args", "conv_dim=2", "--gradient_checkpointing"), True, True, True),
}


@pytest.fixture(scope="module")
def tiny_layers(tiny_sd):
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd.sd1_dir, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd.sd1_dir, subfolder="unet")
    return text_encoder, unet


@pytest.mark.parametrize("mode", list(MODES))
def test_one_step_trains_every_module_kohya_trains(tiny_sd, data, tiny_layers, mode):
    flags, trains_text_encoder, trains_unet, conv = MODES[mode]
    # 128 px: the mid block sees 2x2 latents; over a single token attention's q and k get no gradient
    argv = base_argv(tiny_sd, data, "--resolution", "128", "--max_train_steps", "1", "--cache_latents", *flags)
    train_network.main(argv)
    tensors, _ = load_lora_file(data / "out" / "tiny.safetensors")
    text_encoder, unet = tiny_layers
    parts = ("lora_te_",) * trains_text_encoder + ("lora_unet_",) * trains_unet
    expected = {name for name in kohya_module_names(text_encoder, unet, conv) if name.startswith(parts)}
    assert len(expected) > (60 if trains_unet else 10)
    trained = {key.removesuffix(".lora_up.weight") for key, up in tensors.items() if key.endswith(".lora_up.weight")
               and up.abs().sum() > 0}  # fmt: skip
    untrained = {key.removesuffix(".lora_up.weight") for key in tensors if key.endswith(".lora_up.weight")} - trained
    assert sorted(expected - trained) == [] and sorted(untrained) == []
    assert trained == expected
