"""The DreamBooth/resize bench's own machinery: the bench-only Light LoRA variants start where the
article's variants start (and the suite still refuses both-zero), full fine-tuning runs through
``distill_unet.py`` with checkpoints the bench can score, and the row arithmetic."""

import argparse

import pytest
import torch

import train_network
from bench import lilora_variants
from bench.quality_dreambooth import (
    METHODS,
    _full_finetune_argv,
    _in_workers,
    mean_rank,
    network_parameters,
    score_resized,
    steps_to,
    train_method,
    with_trained,
)
from library.models.stable_diffusion import save_ldm_checkpoint
from library.toy_world.concept import Concept, write_concept_set
from library.toy_world.dreambooth import DreamBoothRun, load_base, train_network_argv
from networks import lilora
from networks.lora_file import load_lora_file
from networks.network_args import NetworkArgsError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer

    root = tmp_path_factory.mktemp("toy_db_bench")
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(root / "tokenizers"))
    save_ldm_checkpoint(build_toy_model(tokenizer, seed=0), root / "toy.safetensors")
    write_concept_set(root / "concept", Concept("purple", "triangle"), images=2, repeats=2, reg_per_colour=1, seed=0)
    return root


def _args(toy_files, **overrides) -> argparse.Namespace:
    values = dict(model=toy_files / "toy.safetensors", tokenizers=toy_files / "tokenizers", steps=2, batch=2,
                  seed=0, train_seed=0, save_every=1, full_lr=1e-4, caption_dropout_rate=0.1, lr_scheduler="constant",
                  threads=1, network_train_unet_only=False, prior_loss_weight=1.0, other_reg_per_combination=0,
                  samples=1, concept="purple triangle", token="sks", images=2, repeats=2,
                  reg_per_colour=1)  # fmt: skip
    return argparse.Namespace(**values | overrides)


def test_the_suite_still_refuses_both_zero():
    with pytest.raises(NetworkArgsError, match="two zero factors stay zero"):
        lilora.create_network(1.0, 4, 4.0, None, None, torch.nn.Sequential(torch.nn.Linear(8, 8)), init="both_zero")


@pytest.mark.parametrize("variant, changes", [("both_zero", False), ("gaussian", True)])
def test_a_variant_trains_through_train_network(toy_files, tmp_path, variant, changes):
    """Both factors zero: every gradient is a product with a zero factor, so the saved update is exactly
    zero after training; with one factor non-zero (Gaussian aux) the same run moves it."""
    run = DreamBoothRun("bench.lilora_variants", 4, 4.0, (f"variant={variant}",), 1e-2, 3, 2, 0)
    base = toy_files
    train_network.main(
        train_network_argv(base / "toy.safetensors", base / "tokenizers", base / "concept", tmp_path, run)
    )
    weights, metadata = load_lora_file(tmp_path / "concept.safetensors")
    assert metadata["ss_network_module"] == "bench.lilora_variants"
    ups = [w for k, w in weights.items() if k.endswith("lora_up.weight")]
    downs = [w for k, w in weights.items() if k.endswith("lora_down.weight")]
    assert ups and downs
    assert any(w.abs().max() > 0 for w in ups) == changes
    assert any(w.abs().max() > 0 for w in downs) == changes


def test_gaussian_aux_has_the_articles_scale_and_the_scaled_one_the_orthonormal_norms(toy_files):
    base = load_base(toy_files / "toy.safetensors", toy_files / "tokenizers")
    plain = lilora_variants.create_network(1.0, 4, 4.0, None, None, base.unet, variant="gaussian")
    scaled = lilora_variants.create_network(1.0, 4, 4.0, None, None, base.unet, variant="gaussian_scaled")
    suite = lilora.create_network(1.0, 4, 4.0, None, None, base.unet, init="up_zero")
    stacked = lambda net, name: torch.cat([getattr(m, name).flatten() for m in net.adapters])  # noqa: E731
    assert stacked(plain, "down_aux").std().item() == pytest.approx(1.0, rel=0.02)
    assert stacked(plain, "up_aux").std().item() == pytest.approx(1.0, rel=0.02)
    assert stacked(plain, "lilora_down").std().item() == pytest.approx(1 / 4, rel=0.05)  # std 1 / rank
    assert all(m.lilora_up.abs().max() == 0 for m in plain.adapters)
    # Scaled: the orthonormal aux's row (down) and column (up) norms of 1 on average.
    for module, reference in zip(scaled.adapters, suite.adapters):
        assert module.down_aux.norm(dim=1).mean().item() == pytest.approx(1.0, rel=0.2)
        assert module.up_aux.norm(dim=0).mean().item() == pytest.approx(1.0, rel=0.2)
        assert not torch.equal(module.down_aux, reference.down_aux)
        assert torch.equal(module.lilora_down, reference.lilora_down)  # the suite's own core init


def test_trainable_parameters_count_the_cores(toy_files):
    base = load_base(toy_files / "toy.safetensors", toy_files / "tokenizers")
    suite = lilora.create_network(1.0, 1, 1.0, None, None, base.unet, init="up_zero")
    expected = sum(m.lilora_down.numel() + m.lilora_up.numel() for m in suite.adapters)
    assert network_parameters(base, METHODS["lilora r1 both_zero"], unet_only=True) == expected
    assert network_parameters(base, METHODS["lilora r1 up_zero"], unet_only=True) == expected
    with_text_encoder = lilora.create_network(1.0, 1, 1.0, None, base.text_encoder, base.unet, init="up_zero")
    expected = sum(m.lilora_down.numel() + m.lilora_up.numel() for m in with_text_encoder.adapters)
    assert network_parameters(base, METHODS["lilora r1 up_zero"], unet_only=False) == expected


def test_full_finetuning_is_distill_unet_on_the_dreambooth_flags(toy_files, tmp_path):
    args = _args(toy_files)
    run = DreamBoothRun(learning_rate=1e-4, max_train_steps=2, train_batch_size=2)
    argv = _full_finetune_argv(args, toy_files / "concept", tmp_path, run)
    assert not [flag for flag in argv if flag.startswith("--network")] and "--network_args" not in argv
    assert f"--teacher={args.model}" in argv and "--output_kd_weight=0" in argv and "--feature_kd_weight=0" in argv
    assert f"--reg_data_dir={toy_files / 'concept' / 'reg'}" in argv and "--prior_loss_weight=1.0" in argv
    heavier = _full_finetune_argv(args, toy_files / "concept", tmp_path, DreamBoothRun(prior_loss_weight=3.0))
    assert "--prior_loss_weight=3.0" in heavier and "--prior_loss_weight=1.0" not in heavier

    base = load_base(args.model, args.tokenizers)
    trained = train_method(args, base, toy_files / "concept", tmp_path, "full unet")
    assert sorted(trained.checkpoints) == [1]
    assert trained.parameters == sum(p.numel() for p in base.unet.parameters())
    tuned = with_trained(base, trained.final, full=True)
    changed = [n for n, p in tuned.unet.named_parameters() if not torch.equal(p, base.unet.get_parameter(n))]
    assert changed  # the fine-tuned UNet, not the base one


def test_a_lora_run_keeps_its_checkpoints_and_resizes_to_the_rank_asked(toy_files, tmp_path):
    args = _args(toy_files, train_seed=5)  # the world (split, concept set) stays seed 0
    base = load_base(args.model, args.tokenizers)
    trained = train_method(args, base, toy_files / "concept", tmp_path, "lora r4")
    assert sorted(trained.checkpoints) == [1]
    assert load_lora_file(trained.final)[1]["ss_seed"] == "5"  # kohya's --seed is the training seed
    assert mean_rank(trained.final) == 4
    (tmp_path / "concept").symlink_to(toy_files / "concept")  # the bench's work folder holds the concept set
    row = score_resized(args, tmp_path, ("lora r4", trained.final, "rank 2", ["--new_rank=2"]))
    resized = tmp_path / "lora_r4_rank_2.safetensors"
    assert mean_rank(resized) == 2 and row.startswith("| lora r4 | rank 2 | 2.00 |")


def test_workers_return_results_in_order():
    assert list(_in_workers(abs, [-3, 1, -2], jobs=2)) == [3, 1, 2]
    assert list(_in_workers(abs, [-3, 1], jobs=1)) == [3, 1]


def test_steps_to_threshold():
    assert steps_to({25: 0.1, 50: 0.8, 75: 0.9}) == "50"
    assert steps_to({25: 0.1, 50: 0.5}) == "> 50"
