"""LoHa/LoKr files written by the real lycoris-lora package, converted to plain LoRA, against LyCORIS's own math."""

import pytest
import torch
from lycoris import kohya as lycoris_kohya  # lycoris-lora, a dev dependency: the formats are LyCORIS's own
from safetensors.torch import load_file

import resize_lora
from library.models.stable_diffusion import load_stable_diffusion
from library.resize.lycoris import lycoris_to_lora
from networks.lora_file import load_lora_file
from tests.cli_runs import exit_status
from tests.kohya_reference import dense_delta

VARIANTS = {
    "loha": {"algo": "loha"},
    "loha_tucker": {"algo": "loha", "use_tucker": "True"},
    "lokr": {"algo": "lokr"},
    "lokr_tucker": {"algo": "lokr", "use_tucker": "True", "factor": "4"},
}


@pytest.fixture(scope="module")
def tiny_sd1(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir)


def lycoris_file(model, variant: str, path):
    """A LyCORIS network on the tiny SD1 model with random weights, saved by LyCORIS; (path, network in float64)."""
    network = lycoris_kohya.create_network(
        1.0, 4, 2.0, model.vae, model.text_encoder, model.unet, conv_dim=3, conv_alpha=1.5, **VARIANTS[variant]
    )
    network.apply_to(model.text_encoder, model.unet, True, True)
    generator = torch.Generator().manual_seed(len(variant))
    with torch.no_grad():
        for parameter in network.parameters():  # LyCORIS zero-initialises one factor: randomise all
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    for lora in network.loras:
        lora.restore()  # unhook from the shared tiny model
    return path, network.double()


def lycoris_update(lora) -> torch.Tensor:
    """LyCORIS's own ΔW of a module (what its forward adds to the weight), as an out x fan_in matrix."""
    with torch.no_grad():
        return lora.get_weight(lora.shape).reshape(lora.shape[0], -1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conversion_is_exact_and_keeps_layer_shapes(variant, tiny_sd1, tmp_path):
    path, network = lycoris_file(tiny_sd1, variant, tmp_path / f"{variant}.safetensors")
    converted = lycoris_to_lora(load_file(path), str(path))
    for lora in network.loras:
        name = lora.lora_name
        up, down = converted[f"{name}.lora_up.weight"], converted[f"{name}.lora_down.weight"]
        update = dense_delta(up, down) * float(converted[f"{name}.alpha"]) / down.shape[0]
        expected = lycoris_update(lora)
        torch.testing.assert_close(update, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
        layer = lora.org_module[0].weight
        if layer.dim() == 4 and layer.shape[2:] != (1, 1):
            assert tuple(down.shape[1:]) == tuple(layer.shape[1:])  # the kernel the file did not store
    assert not any(".hada_" in key or ".lokr_" in key for key in converted)


def test_resize_of_a_loha_is_the_exact_truncation(tiny_sd1, tmp_path):
    path, network = lycoris_file(tiny_sd1, "loha", tmp_path / "loha.safetensors")
    out = tmp_path / "small.safetensors"
    assert exit_status(resize_lora.main, "--model", path, "--save_to", out, "--new_rank", 3) == 0
    resized, _ = load_lora_file(out)
    for lora in network.loras:
        name = lora.lora_name
        down = resized[f"{name}.lora_down.weight"]
        update = dense_delta(resized[f"{name}.lora_up.weight"], down) * float(resized[f"{name}.alpha"]) / down.shape[0]
        u, s, vh = torch.linalg.svd(lycoris_update(lora), full_matrices=False)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(update, best, rtol=1e-5, atol=1e-5 * float(s[0]))
