"""The narrow-FFN bench's machinery: tools/compress_ffn.py's stages chained by their files, the
Theseus stage read at p = 1 and at its end, and the scored model is the narrowed one."""

import argparse

import pytest
import torch

from bench.quality_ffn import _narrowed, calibrate, stage_files
from library.distill.cost import count_parameters
from library.ffn_compression.unet import compress_unet
from library.models.stable_diffusion import save_ldm_checkpoint
from library.toy_world.dreambooth import load_base
from library.toy_world.fidelity import prediction_batch, prediction_mse
from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer
from networks.lora_file import load_lora_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

COMBINATIONS = [("red", "star"), ("blue", "ring"), ("white", "cross"), ("green", "square")]


def _args(root, **overrides) -> argparse.Namespace:
    values = dict(model=root / "toy.safetensors", tokenizers=root / "tokenizers", seed=0, train_seed=0,
                  ffn_blocks="all", ffn_images=4, ffn_blockwise_steps=2, ffn_theseus_steps=4, ffn_lr=1e-3,
                  ffn_last_stage="theseus")  # fmt: skip
    return argparse.Namespace(**values | overrides)


def test_the_stages_chain_and_theseus_is_read_at_p_1_and_at_its_end(tmp_path):
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(tmp_path / "tokenizers"))
    save_ldm_checkpoint(build_toy_model(tokenizer, seed=0), tmp_path / "toy.safetensors")
    args = _args(tmp_path)
    common, calibration_file = calibrate(args, tmp_path / "ffn", COMBINATIONS)
    found = list(stage_files(args, common, calibration_file, 0.25, "prune"))
    labels = [label for label, _, _ in found]
    assert labels == ["init", "blockwise", "theseus (p = 1)", "+ end to end"]
    files = {label: path for label, path, _ in found}
    assert all(path.is_file() for path in files.values())
    assert files["theseus (p = 1)"].name == "theseus_prune_0.25-step00000002.safetensors"
    p_one, _ = load_lora_file(files["theseus (p = 1)"])
    end, metadata = load_lora_file(files["+ end to end"])
    assert metadata["lowrank_ffn_init"] == "prune"
    assert any(not torch.equal(p_one[key], end[key]) for key in end)  # the end-to-end steps trained on

    original = load_base(args.model, args.tokenizers)
    unet, network = _narrowed(original.unet, files["init"])
    assert all(m.hidden_width == m.full_width // 4 for m in network.ffn_modules)
    batch = prediction_batch(original, COMBINATIONS, count=4, seed=0)
    assert prediction_mse(unet, original.unet, batch) > 0  # the scored UNet runs the narrow FFNs
    assert prediction_mse(original.unet, original.unet, batch) == 0  # and the original was left alone
    assert count_parameters(compress_unet(unet, network)) < count_parameters(original.unet)
