"""Calibration against the FFN inputs and UNet calls seen by independent hooks on the tiny SD1 model."""

import copy
import math

import pytest
import torch

from library.data.dataset_config import build_blueprints
from library.data.dataset_group import build_dataset_group
from library.errors import ConfigError
from library.ffn_compression.calibration import (
    Calibration,
    FFNRecorder,
    TokenReservoir,
    calibrate_on_dataset,
    calibrate_on_prompts,
    relative_errors,
    spread_timesteps,
)
from library.ffn_compression.statistics import HiddenStats
from library.models.stable_diffusion import load_stable_diffusion
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.training.args import parse_args, train_network_parser, verify_training_args
from library.training.sampling import SamplePrompt
from networks import lowrank_ffn

BLOCKS = "IN7,MID,OUT3"


@pytest.fixture(scope="module")
def sd1(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir)


def targets(unet, blocks=BLOCKS):
    return {t.name: t.module for t in lowrank_ffn.select_targets(unet, lowrank_ffn.parse_blocks(blocks))}


class CallLog:
    """The UNet's calls (latents, timesteps, contexts) and every FFN input, seen by hooks of the test's own."""

    def __init__(self, unet, ffns):
        self.calls, self.inputs = [], {name: [] for name in ffns}
        self.handles = [unet.register_forward_pre_hook(self._call, with_kwargs=True)]
        for name, ff in ffns.items():
            self.handles.append(ff.register_forward_pre_hook(lambda m, args, n=name: self.inputs[n].append(args[0])))

    def _call(self, module, args, kwargs):
        values = dict(zip(("sample", "timestep", "encoder_hidden_states"), args)) | kwargs
        self.calls.append((values["sample"], values["timestep"], values["encoder_hidden_states"]))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_statistics_hold_the_hidden_tokens_of_fit_calls_only(sd1):
    ffns = targets(sd1.unet)
    log = CallLog(sd1.unet, ffns)
    generator = torch.Generator().manual_seed(0)
    with FFNRecorder(ffns, tokens=10_000) as recorder, torch.no_grad():
        for heldout in (False, True, False):
            recorder.heldout = heldout
            sd1.unet(torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([50, 900]), torch.randn(2, 77, 64))
    log.remove()
    for name, ff in ffns.items():
        fit_inputs = torch.cat([log.inputs[name][0], log.inputs[name][2]]).reshape(-1, ff.net[0].proj.in_features)
        with torch.no_grad():
            reference = HiddenStats.empty(ff.net[2].in_features)
            reference.add(ff.net[0](fit_inputs))
        stats = recorder.stats[name]
        assert stats.count == reference.count == len(fit_inputs)
        # float32 products summed per call here, over all calls at once in the reference
        torch.testing.assert_close(stats.covariance(), reference.covariance(), rtol=1e-5, atol=1e-6)
        result = recorder.result({})
        held_out = log.inputs[name][1].reshape(-1, fit_inputs.shape[1])
        assert torch.equal(result.heldout[name].sort(0).values, held_out.sort(0).values)  # every token
        assert len(result.fit[name]) == len(fit_inputs)


def test_the_reservoir_keeps_all_rows_until_full_then_a_uniform_sample():
    reservoir = TokenReservoir(1000, torch.Generator().manual_seed(0))
    stream = torch.arange(20_000.0)[:, None]
    reservoir.offer(stream[:600])
    assert torch.equal(reservoir.sample, stream[:600])
    for chunk in stream[600:].split(3_700):
        reservoir.offer(chunk)
    kept = reservoir.sample.squeeze(1)
    assert len(kept) == 1000 == len(kept.unique()) and reservoir.seen == 20_000
    # Each quarter of the stream holds a quarter of the sample (binomial sd 0.014; 0.05 is 3.6 sd).
    quarters = torch.bincount((kept // 5_000).long(), minlength=4) / 1000
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.05), quarters


def test_recorded_tokens_are_capped_and_come_from_the_inputs(sd1):
    ffns = targets(sd1.unet, "IN4")  # 16 tokens per sample at 8x8 latents / 2
    log = CallLog(sd1.unet, ffns)
    with FFNRecorder(ffns, tokens=5) as recorder, torch.no_grad():
        sd1.unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 77, 64))
    log.remove()
    (name,) = ffns
    kept, offered = recorder.result({}).fit[name], log.inputs[name][0].reshape(-1, 64)
    assert kept.shape == (5, 64) and recorder.stats[name].count == 2 * 16
    assert all((offered == row).all(1).any() for row in kept)


def test_dataset_batches_run_at_spread_timesteps_with_and_without_captions(sd1, tiny_sd, tmp_path):
    argv = ["--pretrained_model_name_or_path", str(tiny_sd.sd1_dir), "--output_dir", str(tmp_path)]
    argv += ["--train_data_dir", str(tiny_sd.train_data_dir), "--caption_extension", ".txt", "--resolution", "64"]
    args = parse_args(train_network_parser(), argv)
    verify_training_args(args)
    group = build_dataset_group(build_blueprints(args), sd1.tokenizer, seed=0)
    ffns = targets(sd1.unet)
    log = CallLog(sd1.unet, ffns)
    with FFNRecorder(ffns, tokens=1) as recorder:
        batches = calibrate_on_dataset(sd1, group, recorder, timesteps=3, holdout_every=2, max_batches=4)
    log.remove()
    assert batches == 4 and len(log.calls) == 4 * 3
    assert [int(t[0]) for _, t, _ in log.calls[:3]] == [166, 500, 833] == spread_timesteps(3)
    empty = encode_tokens(sd1.text_encoder, tokenize_captions(sd1.tokenizer, [""]))
    for _, timesteps, context in log.calls:
        assert len(timesteps) == 2 and torch.equal(timesteps[0], timesteps[1])  # caption and empty caption
        torch.testing.assert_close(context[1], empty[0])
        assert not torch.allclose(context[0], context[1])
    name = lowrank_ffn.select_targets(sd1.unet, ("MID",))[0].name
    assert recorder.stats[name].count == 2 * 3 * 2 * 1  # fit batches x timesteps x (caption, empty) x 1x1 tokens


def test_prompts_are_sampled_with_cfg_and_every_other_prompt_is_held_out(sd1):
    ffns = targets(sd1.unet, "MID")
    log = CallLog(sd1.unet, ffns)
    prompts = [SamplePrompt(p, width=64, height=64, sample_steps=3, seed=i) for i, p in enumerate(["a toy", "a cube"])]
    with FFNRecorder(ffns, tokens=100) as recorder:
        assert calibrate_on_prompts(sd1, prompts, recorder, holdout_every=2) == 2
    log.remove()
    assert len(log.calls) == 6 and all(len(latents) == 2 for latents, _, _ in log.calls)  # negative and prompt
    (name,) = ffns
    result = recorder.result({})
    assert result.stats[name].count == 3 * 2 and len(result.heldout[name]) == 3 * 2


def test_calibration_file_round_trip(tmp_path):
    stats = HiddenStats.empty(3)
    stats.add(torch.randn(7, 3))
    calibration = Calibration({"a": stats}, {"a": torch.randn(4, 2)}, {}, {"prompts": 2})
    calibration.save(tmp_path / "c.safetensors")
    again = Calibration.load(tmp_path / "c.safetensors")
    assert again.info == {"prompts": 2} and again.heldout == {} and torch.equal(again.fit["a"], calibration.fit["a"])
    assert again.stats["a"].count == 7 and torch.equal(again.stats["a"].outer, stats.outer)


def test_relative_error_is_zero_at_full_width_and_the_frobenius_ratio_otherwise(sd1):
    unet = copy.deepcopy(sd1.unet)
    tokens = {n: torch.randn(50, ff.net[0].proj.in_features) for n, ff in targets(unet).items()}
    full = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=BLOCKS, ratio="1")
    assert relative_errors(full, tokens) == dict.fromkeys(tokens, 0.0)
    narrow = lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks=BLOCKS, ratio="0.25")
    errors = relative_errors(narrow, tokens, chunk=7)
    for module in narrow.ffn_modules:
        with torch.no_grad():
            y, y_narrow = module.original(tokens[module.lora_name]), module.narrow(tokens[module.lora_name])
        assert errors[module.lora_name] == pytest.approx(((y - y_narrow).norm() / y.norm()).item(), rel=1e-5)
        assert 0 < errors[module.lora_name] < math.inf


def test_a_replaced_ffn_cannot_be_calibrated(sd1):
    unet = copy.deepcopy(sd1.unet)
    lowrank_ffn.create_network(1.0, None, None, None, None, unet, blocks="MID", ratio="0.5").apply_to(None, unet)
    with pytest.raises(ConfigError, match="a network replaces lora_unet_mid_block"):
        FFNRecorder(targets(unet, "MID"), tokens=1)
