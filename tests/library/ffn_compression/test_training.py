"""Block-wise training on cached FFN inputs, and the Theseus step, on the tiny SD1 model."""

import copy

import pytest
import torch
from accelerate import Accelerator

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import build_dataset_group
from library.errors import ConfigError
from library.ffn_compression.calibration import FFNRecorder, calibrate_on_dataset
from library.ffn_compression.initialise import initialise_network
from library.ffn_compression.pipeline import parse_stage_args
from library.ffn_compression.training import TheseusNetworkTask, TokenBatches, original_outputs, train_blockwise
from library.models.stable_diffusion import load_stable_diffusion
from library.training.args import verify_training_args
from library.training.noise import NoiseOptions
from networks import lowrank_ffn

# The tiny UNet's 4x4 stage: 16 tokens per sample, so a few batches give more fit tokens than hidden units
# (its MID sees one token per sample, where a least-squares init already fits the few tokens there are).
BLOCKS = "IN4,IN5,OUT6,OUT7,OUT8"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def stage_args(stage, tiny_sd, tmp_path, *extra):
    argv = [stage, "--pretrained_model_name_or_path", str(tiny_sd.sd1_dir), "--output_dir", str(tmp_path / "out")]
    argv += ["--train_data_dir", str(tiny_sd.train_data_dir), "--caption_extension", ".txt", "--resolution", "64"]
    argv += ["--seed", "3", "--max_data_loader_n_workers", "0", *extra]
    args = parse_stage_args(argv)
    verify_training_args(args)
    return args


@pytest.fixture(scope="module")
def sd1(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir)


@pytest.fixture(scope="module")
def calibration(sd1, tiny_sd, tmp_path_factory):
    args = stage_args("calibrate", tiny_sd, tmp_path_factory.mktemp("calibration"))
    group = build_dataset_group(build_blueprints(args), sd1.tokenizer, seed=0)
    ffns = {t.name: t.module for t in lowrank_ffn.select_targets(sd1.unet, lowrank_ffn.parse_blocks(BLOCKS))}
    with FFNRecorder(ffns, tokens=2048) as recorder:
        calibrate_on_dataset(sd1, group, recorder, timesteps=4, holdout_every=3, max_batches=12)
    return recorder.result({})


def test_token_batches_cover_every_ffns_tokens_and_wrap_the_shorter():
    inputs = {"a": torch.arange(10.0)[:, None], "b": torch.arange(4.0)[:, None]}
    targets = {name: -x for name, x in inputs.items()}
    batches = TokenBatches(inputs, targets, batch_tokens=3, seed=0)
    assert len(batches) == 4
    items = [batches[i] for i in range(len(batches))]
    seen_a = torch.cat([item["a"][0] for item in items]).flatten().tolist()
    assert sorted(seen_a[:10]) == list(range(10))  # one pass over the longest FFN's tokens per epoch
    seen_b = torch.cat([item["b"][0] for item in items]).flatten().tolist()
    assert sorted(seen_b[:4]) == sorted(seen_b[4:8]) == sorted(seen_b[8:]) == list(range(4))  # shorter ones wrap
    assert all(torch.equal(item["a"][1], -item["a"][0]) for item in items)  # inputs stay paired with targets


def relative_mse(network, tokens):
    """Each FFN's MSE against its original, over the original output's mean square."""
    targets, errors = original_outputs(network, tokens), {}
    with torch.no_grad():
        for module in network.ffn_modules:
            target = targets[module.lora_name]
            error = (module.narrow(tokens[module.lora_name]) - target).square().mean() / target.square().mean()
            errors[module.lora_name] = error.item()
    return errors


def test_blockwise_training_lowers_every_blocks_error(sd1, tiny_sd, tmp_path, calibration):
    unet = copy.deepcopy(sd1.unet)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=BLOCKS, ratio="0.1875")
    initialise_network(network, calibration.stats, "pca")
    fit_before, heldout_before = relative_mse(network, calibration.fit), relative_mse(network, calibration.heldout)
    args = stage_args("blockwise", tiny_sd, tmp_path, "--max_train_steps", "60", "--optimizer_type", "Adafactor")
    args.token_batch_size = 128
    train_blockwise(args, unet, network, calibration, {"lowrank_ffn_stage": "blockwise"})
    fit_after, heldout_after = relative_mse(network, calibration.fit), relative_mse(network, calibration.heldout)
    assert all(fit_after[name] < 0.9 * fit_before[name] for name in fit_before), (fit_before, fit_after)
    assert all(heldout_after[n] < 0.95 * heldout_before[n] for n in heldout_before), (heldout_before, heldout_after)
    saved_file = tmp_path / "out" / "blockwise.safetensors"
    saved = lowrank_ffn.create_network_from_weights(1.0, saved_file, None, None, unet)[0]
    assert saved.widths == network.widths


def test_blockwise_needs_tokens_for_every_ffn(sd1, tiny_sd, tmp_path, calibration):
    unet = copy.deepcopy(sd1.unet)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks="MID", ratio="0.5")
    args = stage_args("blockwise", tiny_sd, tmp_path, "--max_train_steps", "1")
    with pytest.raises(ConfigError, match="no tokens for lora_unet_mid_block_attentions_0_transformer_blocks_0_ff"):
        train_blockwise(args, unet, network, calibration, {})


def theseus_task(sd1, tiny_sd, tmp_path, schedule):
    unet = copy.deepcopy(sd1.unet)
    model = copy.copy(sd1)
    model.unet = unet
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=BLOCKS, ratio="0.25")
    network.apply_to(None, unet)
    args = stage_args("theseus", tiny_sd, tmp_path, "--theseus_schedule", schedule)
    group = build_dataset_group(build_blueprints(args), sd1.tokenizer, seed=0)
    group.set_current_epoch(1)
    task = TheseusNetworkTask(
        args, Accelerator(cpu=True), model, network, NoiseOptions.from_args(args), False, {}, group, [group[0]]
    )
    return task, network, group[1]


def test_a_step_that_replaces_nothing_trains_nothing(sd1, tiny_sd, tmp_path):
    task, network, batch = theseus_task(sd1, tiny_sd, tmp_path, "constant:0")
    task.on_step_start(0)
    assert not any(m.use_successor for m in network.ffn_modules)
    loss, extra = task.training_step(batch)
    loss.backward()
    assert extra["theseus/probability"] == 0.0 and extra["theseus/replaced"] == 0.0
    assert all(p.grad is None for p in network.parameters())


def test_a_replaced_unit_gets_gradients_and_validation_uses_every_unit(sd1, tiny_sd, tmp_path):
    replaced, network, batch = theseus_task(sd1, tiny_sd, tmp_path, "constant:1")
    replaced.on_step_start(5)
    replaced.training_step(batch)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    student_loss = replaced.validate()["loss/validation"]

    half, network, _ = theseus_task(sd1, tiny_sd, tmp_path, "constant:0.5")
    half.network.load_state_dict(replaced.network.state_dict())
    half.on_step_start(5)
    drawn = [m.use_successor for m in network.ffn_modules]
    assert 0 < sum(drawn) < len(drawn)
    assert half.validate()["loss/validation"] == pytest.approx(student_loss, rel=1e-6)
    assert [m.use_successor for m in network.ffn_modules] == drawn  # the step's draw is back


def test_block_targets_come_from_the_original_in_its_own_dtype(sd1):
    unet = copy.deepcopy(sd1.unet).to(torch.bfloat16)
    network = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks="MID", ratio="0.5")
    (module,) = network.ffn_modules
    tokens = torch.randn(5, 64)
    targets = original_outputs(network, {module.lora_name: tokens})[module.lora_name]
    with torch.no_grad():
        reference = copy.deepcopy(module.original).float()(tokens)
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets, reference, rtol=2e-2, atol=2e-2)
