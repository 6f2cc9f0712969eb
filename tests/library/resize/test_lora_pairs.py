"""Finding LoRA pairs in kohya, PEFT and ControlLoRA files; refusing what cannot be resized exactly."""

import pytest
import torch

from library.resize.lora_pairs import LoRAPair, find_lora_pairs
from networks.lora_file import LoRAFileError


def test_kohya_peft_and_controllora_pairs():
    sd = {
        "lora_unet_a.lora_down.weight": torch.zeros(2, 3),
        "lora_unet_a.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_a.alpha": torch.tensor(1.0),
        "base_model.model.b.lora_A.weight": torch.zeros(2, 3),
        "base_model.model.b.lora_B.weight": torch.zeros(4, 2),
        "c.down": torch.zeros(2, 3),
        "c.up": torch.zeros(4, 2),
        "bundle_emb.x.string_to_param.*": torch.zeros(2, 8),
    }
    pairs = find_lora_pairs(sd, "f.safetensors")
    assert pairs == [
        LoRAPair(
            "lora_unet_a", "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.lora_mid.weight"
        ),
        LoRAPair("base_model.model.b", "base_model.model.b.lora_A.weight", "base_model.model.b.lora_B.weight"),
        LoRAPair("c", "c.down", "c.up"),
    ]
    assert pairs[0].keys == (
        "lora_unet_a.lora_down.weight",
        "lora_unet_a.lora_up.weight",
        "lora_unet_a.lora_mid.weight",
        "lora_unet_a.alpha",
    )


def test_tucker_locon_pair_is_checked():
    sd = {
        "m.lora_down.weight": torch.zeros(4, 6, 1, 1),
        "m.lora_mid.weight": torch.zeros(4, 4, 3, 3),
        "m.lora_up.weight": torch.zeros(5, 4, 1, 1),
    }
    assert find_lora_pairs(sd, "f")[0].mid_key == "m.lora_mid.weight"
    sd["m.lora_mid.weight"] = torch.zeros(4, 3, 3, 3)
    with pytest.raises(LoRAFileError, match="'m': lora_mid"):
        find_lora_pairs(sd, "f")


@pytest.mark.parametrize(
    ("key", "module_type"),
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.lokr_w1", "LoKr"),
        ("lora_unet_x.lokr_w1_a", "LoKr"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("lora_unet_x.diff", "LyCORIS full"),
    ],
)
def test_lycoris_modules_are_refused_by_name(key, module_type):
    sd = {"lora_unet_y.lora_down.weight": torch.zeros(2, 3), "lora_unet_y.lora_up.weight": torch.zeros(4, 2)}
    sd[key] = torch.zeros(2, 2)
    with pytest.raises(LoRAFileError, match=rf"ly.safetensors: module 'lora_unet_x' is a {module_type} module"):
        find_lora_pairs(sd, "ly.safetensors")


@pytest.mark.parametrize(
    ("sd", "message"),
    [
        (
            {"a.lora_down.weight": torch.zeros(2, 3), "a.lora_up.weight": torch.zeros(4, 3)},
            "module 'a': rank mismatch",
        ),
        ({"a.lora_down.weight": torch.zeros(2, 3)}, "'a.lora_down.weight' has no matching 'a.lora_up.weight'"),
        ({"model.diffusion_model.x.weight": torch.zeros(2, 3)}, "no LoRA modules found"),
        (
            {"a.lora_down.weight": torch.zeros(2, 3), "a.lora_up.weight": torch.zeros(4, 2), "a.alpha": torch.ones(2)},
            "'a.alpha' has shape",
        ),
    ],
)
def test_broken_files_get_one_clear_line(sd, message):
    with pytest.raises(LoRAFileError, match=message) as err:
        find_lora_pairs(sd, "bad.safetensors")
    assert str(err.value).startswith("bad.safetensors") and "\n" not in str(err.value)
