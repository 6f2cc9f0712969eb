"""Frozen fp16/bf16 weights kept as stored in a float32 run: the same numbers, half the memory."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from library.models.narrow_weights import (
    folder_load_dtype,
    has_narrow_weights,
    keep_weights_narrow,
    place_keeping_narrow,
    stored_float_dtype,
)
from library.models.stable_diffusion import load_stable_diffusion, save_diffusers_folder
from library.training.model_setup import loading_options

REPO = Path(__file__).resolve().parents[3]
TOY = REPO / "assets" / "toy_world" / "toy_sd1.safetensors"
TOKENIZERS = REPO / "assets" / "toy_world" / "tokenizers"
FLOAT32 = {"dtype": torch.float32, "vae_dtype": torch.float32}


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    """The toy model as a fp16 diffusers folder."""
    folder = tmp_path_factory.mktemp("narrow") / "toy_fp16"
    model = load_stable_diffusion(TOY, tokenizer_cache_dir=TOKENIZERS)
    save_diffusers_folder(model, folder, dtype=torch.float16)
    return folder


def load_pair(path: Path):
    tokenizers = {"tokenizer_cache_dir": TOKENIZERS} if path.is_file() else {}
    wide = load_stable_diffusion(path, **tokenizers, **FLOAT32)
    narrow = load_stable_diffusion(path, **tokenizers, **FLOAT32, keep_narrow=True)
    return wide, narrow


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("source", ["single_file", "diffusers_folder"])
def test_narrow_model_computes_the_float32_models_numbers_bit_for_bit(source, toy_folder):
    wide, narrow = load_pair(TOY if source == "single_file" else toy_folder)
    for part in ("unet", "text_encoder", "vae"):
        assert has_narrow_weights(getattr(narrow, part)) and not has_narrow_weights(getattr(wide, part))
        assert getattr(narrow, part).dtype == torch.float32  # the dtype pipelines cast their inputs to
        kept = [p for p in getattr(narrow, part).parameters() if p.dtype == torch.float16]
        halved = sum(p.numel() for p in kept) * 2
        assert parameter_bytes(getattr(narrow, part)) == parameter_bytes(getattr(wide, part)) - halved
    unet_weights = sum(p.numel() for p in narrow.unet.parameters())
    assert sum(p.numel() for p in narrow.unet.parameters() if p.dtype == torch.float16) > 0.9 * unet_weights
    torch.manual_seed(0)
    ids = torch.randint(0, wide.text_encoder.config.vocab_size, (2, 77))
    hidden = wide.text_encoder(ids)[0]
    assert torch.equal(hidden, narrow.text_encoder(ids)[0])
    x = torch.randn(2, wide.unet.config.in_channels, 8, 8)
    results = []
    for model in (wide, narrow):
        sample, context = x.clone().requires_grad_(True), hidden.detach().clone().requires_grad_(True)
        out = model.unet(sample, torch.tensor([10, 700]), context).sample
        out.pow(2).sum().backward()
        results.append((out.detach(), sample.grad, context.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = wide.vae.encode(image).latent_dist.mean
    assert torch.equal(latents, narrow.vae.encode(image).latent_dist.mean)
    assert torch.equal(wide.vae.decode(latents).sample, narrow.vae.decode(latents).sample)


def test_a_training_step_never_keeps_a_widened_weight_for_backward():
    wide, narrow = load_pair(TOY)
    weight_shapes = {tuple(layer.weight.shape) for layer in narrow.unet.modules() if isinstance(layer, nn.Linear)}

    def saved_float32_weights(unet: nn.Module) -> int:
        saved = []

        def pack(tensor):
            if tensor.dtype == torch.float32 and tuple(tensor.shape) in weight_shapes:
                saved.append(tensor)
            return tensor

        x = torch.randn(1, 4, 8, 8, requires_grad=True)
        context = torch.randn(1, 77, unet.config.cross_attention_dim)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(x, torch.tensor([500]), context).sample.sum().backward()
        return len(saved)

    assert saved_float32_weights(wide.unet) > 10  # the plain model keeps its weights for backward
    assert saved_float32_weights(narrow.unet) == 0


def test_lora_over_narrow_layers_gets_the_float32_models_gradients():
    import networks.lora as lora

    grads = []
    for model in load_pair(TOY):
        torch.manual_seed(1)
        network = lora.create_network(1.0, 4, 4, model.vae, model.text_encoder, model.unet)
        network.apply_to(model.text_encoder, model.unet, True, True)
        for param in network.parameters():  # kohya's init leaves up at zero: give the path a gradient
            torch.nn.init.normal_(param, std=0.02)
        ids = torch.randint(0, model.text_encoder.config.vocab_size, (1, 77))
        out = model.unet(torch.randn(1, 4, 8, 8), torch.tensor([300]), model.text_encoder(ids)[0]).sample
        out.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in network.parameters()])
    assert len(grads[0]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_trained_layers_and_wide_files_are_left_alone():
    layer = nn.Linear(8, 8).half()
    assert keep_weights_narrow(nn.Sequential(nn.Linear(8, 8), layer)) == 0  # trainable: a plain layer
    frozen = nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 8).half()).requires_grad_(False)
    assert keep_weights_narrow(frozen) == 1  # the first parameter stays wide: the model's reported dtype
    assert frozen[0].weight.dtype == torch.float32 and frozen[1].weight.dtype == torch.float16
    assert frozen[1].bias.dtype == torch.float32
    wide = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).requires_grad_(False)
    assert keep_weights_narrow(wide) == 0


def test_placing_a_narrow_model_moves_it_without_widening():
    frozen = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).half()).requires_grad_(False)
    keep_weights_narrow(frozen)
    place_keeping_narrow(frozen, "cpu", torch.float32)
    assert frozen[1].weight.dtype == torch.float16
    plain = nn.Linear(4, 4).half()
    place_keeping_narrow(plain, "cpu", torch.float32)
    assert plain.weight.dtype == torch.float32


def test_folders_are_loaded_narrow_only_when_every_tensor_shares_one_narrow_dtype(tmp_path, toy_folder):
    from safetensors.torch import save_file

    assert folder_load_dtype(toy_folder / "unet", torch.float32, True) == torch.float16
    assert folder_load_dtype(toy_folder / "unet", torch.float32, False) == torch.float32
    assert folder_load_dtype(toy_folder / "unet", torch.bfloat16, True) == torch.bfloat16
    save_file({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(2)}, tmp_path / "mixed.safetensors")
    assert stored_float_dtype([tmp_path / "mixed.safetensors"]) is None
    assert folder_load_dtype(tmp_path, torch.float32, True) == torch.float32
    (tmp_path / "f8").mkdir()
    save_file({"a": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "f8" / "model.safetensors")
    assert folder_load_dtype(tmp_path / "f8", torch.float32, True) == torch.float32


def test_the_trainer_keeps_weights_narrow_unless_highvram_or_base_weights():
    args = argparse.Namespace(mixed_precision="no", no_half_vae=False, base_weights=None, highvram=False)
    assert loading_options(args, frozen_dtypes=True)["keep_narrow"] is True
    assert "keep_narrow" not in loading_options(args)  # other loaders (distillation, FFN compression)
    args.highvram = True  # kohya's "memory is plentiful": float32 copies, no widening per step
    assert loading_options(args, frozen_dtypes=True)["keep_narrow"] is False
    args.highvram, args.base_weights = False, ["base.safetensors"]  # merged into: would round the merge
    assert loading_options(args, frozen_dtypes=True)["keep_narrow"] is False


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_narrow_layers_compile_with_torch_compile(backend):
    def make() -> nn.Module:
        torch.manual_seed(0)
        layers = [nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(128, 4)]
        return nn.Sequential(*layers).half().requires_grad_(False)

    wide, narrow = make().float(), make()
    assert keep_weights_narrow(narrow) == 2
    compiled = torch.compile(narrow, backend=backend)
    results = []
    for model in (wide, compiled):
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        out = model(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), x.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_loading_in_a_mixed_precision_dtype_casts_without_diffusers_warning(capfd):
    model = load_stable_diffusion(TOY, tokenizer_cache_dir=TOKENIZERS, dtype=torch.bfloat16, vae_dtype=torch.float32)
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert not has_narrow_weights(model.unet)  # narrow storage is for float32 parts only
    assert "kept in float32" not in capfd.readouterr().err  # diffusers' ModelMixin.to() warns on every cast
