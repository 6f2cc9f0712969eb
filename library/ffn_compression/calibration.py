"""Calibration: run the original UNet and record, per selected FFN, hidden statistics and input tokens.

``create_network`` sees no data, so calibration is a step of its own whose result
(:class:`Calibration`, saved as one safetensors file) feeds the initialisation, the block-wise
training (cached FFN inputs; targets are the original FFN's outputs) and the held-out errors.

Inputs cover several timesteps, with and without the prompt:

* prompts (kohya's prompt files, as ``--sample_prompts``): each is sampled with its sampler, steps
  and CFG scale, so every denoising step runs the UNet on ``[negative, prompt]``: the inputs the
  UNet sees at inference, along its own trajectory;
* dataset batches (kohya's dataset flags or ``--dataset_config``): each is noised at
  ``timesteps`` levels spread evenly over [0, T) and run with its captions and with empty ones.

Held out: every ``holdout_every``-th prompt or batch, whole (the steps of one trajectory are alike),
feeds only the held-out token sample and never the statistics.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from library.data.dataset_group import DatasetGroup, batch_latents
from library.errors import ConfigError
from library.ffn_compression.statistics import HiddenStats
from library.fileio import read_state_dict, save_state_dict
from library.models.stable_diffusion import StableDiffusionModel
from library.models.text_encoding import encode_tokens, tokenize_captions
from library.training.sampling import SamplePrompt, make_sampler
from networks.lowrank_ffn import LowRankFFNNetwork, ffn_layers

CALIBRATION_METADATA = "lowrank_ffn_calibration"
SPLITS = ("fit", "heldout")


@dataclass
class Calibration:
    """Per FFN (kohya module name): hidden statistics of the fit items, and sampled input tokens."""

    stats: dict[str, HiddenStats]
    fit: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for name, stats in self.stats.items():
            tensors |= stats.state_dict(f"stats.{name}.")
        for split in SPLITS:
            tensors |= {f"{split}.{name}": x.contiguous() for name, x in getattr(self, split).items()}
        save_state_dict(tensors, path, metadata={CALIBRATION_METADATA: json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        if not str(path).endswith(".safetensors"):
            raise ConfigError(f"'{path}' is not a calibration file (.safetensors written by the calibrate stage)")
        tensors = read_state_dict(path)
        with safe_open(str(path), framework="pt") as f:
            info = (f.metadata() or {}).get(CALIBRATION_METADATA)
        if info is None:
            raise ConfigError(f"'{path}' is not a calibration file written by tools/compress_ffn.py calibrate")
        names = {key.split(".")[1] for key in tensors if key.startswith("stats.")}
        stats = {name: HiddenStats.from_state_dict(tensors, f"stats.{name}.") for name in names}
        splits = {
            split: {key.partition(".")[2]: x for key, x in tensors.items() if key.startswith(f"{split}.")}
            for split in SPLITS
        }
        return cls(stats, splits["fit"], splits["heldout"], json.loads(info))


class TokenReservoir:
    """A uniform sample of at most ``capacity`` of all the rows offered (Algorithm R), kept on the CPU.

    Memory stays bounded however long calibration runs (100 prompts x 30 steps at 512 px offer
    millions of tokens to an outer FFN), and every token seen has the same chance to be kept.
    """

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator = capacity, generator
        self.rows: torch.Tensor | None = None
        self.filled = self.seen = 0

    def offer(self, rows: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = torch.empty(self.capacity, rows.shape[1])
        head = min(self.capacity - self.filled, len(rows))
        self.rows[self.filled : self.filled + head] = rows[:head].float().cpu()
        self.filled += head
        rest = len(rows) - head
        if rest:
            # Row t of the stream replaces a uniform slot of [0, t] when that slot exists; of rows
            # aiming at one slot, the last wins, as if they had been offered one by one.
            stream = torch.arange(self.seen + head, self.seen + len(rows), dtype=torch.float64)
            slots = (torch.rand(rest, generator=self.generator, dtype=torch.float64) * (stream + 1)).long()
            hits = (slots < self.capacity).nonzero().squeeze(1)
            last = torch.full((self.capacity,), -1).scatter_reduce(0, slots[hits], hits, "amax")
            replaced = (last >= 0).nonzero().squeeze(1)
            picked = (head + last[replaced]).to(rows.device)
            self.rows[replaced] = rows[picked].float().cpu()
        self.seen += len(rows)

    @property
    def sample(self) -> torch.Tensor:
        return self.rows[: self.filled] if self.rows is not None else torch.empty(0)


class FFNRecorder:
    """Hooks on original FFNs (``{kohya module name: FeedForward}``): statistics and token samples.

    While ``heldout`` is false, each call adds all tokens of ``net.2``'s input to the FFN's
    statistics. The FFN's input tokens go to a :class:`TokenReservoir` of ``tokens`` rows per FFN
    and split (fit, held out).
    """

    def __init__(self, ffns: Mapping[str, torch.nn.Module], tokens: int, seed: int = 0):
        patched = [name for name, ff in ffns.items() if "forward" in ff.__dict__]
        if patched:
            raise ConfigError(
                f"calibration needs the original FFNs, but a network replaces {patched[0]}: calibrate the base model"
            )
        self.ffns = dict(ffns)
        generator = torch.Generator().manual_seed(seed)
        self.reservoirs = {split: {name: TokenReservoir(tokens, generator) for name in self.ffns} for split in SPLITS}
        self.heldout = False
        self.stats: dict[str, HiddenStats] = {}
        self._handles = []

    def __enter__(self) -> FFNRecorder:
        for name, ff in self.ffns.items():
            _, out = ffn_layers(name, ff)
            self._handles.append(ff.register_forward_pre_hook(partial(self._input, name)))
            self._handles.append(out.register_forward_pre_hook(partial(self._hidden, name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input(self, name: str, module: torch.nn.Module, args: tuple) -> None:
        rows = args[0].detach().reshape(-1, args[0].shape[-1])
        self.reservoirs["heldout" if self.heldout else "fit"][name].offer(rows)

    def _hidden(self, name: str, module: torch.nn.Module, args: tuple) -> None:
        if self.heldout:
            return
        hidden = args[0]
        if name not in self.stats:
            self.stats[name] = HiddenStats.empty(hidden.shape[-1], hidden.device)
        self.stats[name].add(hidden)

    def result(self, info: dict) -> Calibration:
        missing = [name for name in self.ffns if name not in self.stats]
        if missing:
            raise ConfigError(f"calibration ran no fit input through {missing[0]}: give more prompts or images")
        tokens = {
            split: {name: r.sample for name, r in self.reservoirs[split].items() if r.filled} for split in SPLITS
        }
        stats = {n: HiddenStats(s.count, s.total.cpu(), s.outer.cpu()) for n, s in self.stats.items()}
        return Calibration(stats, tokens["fit"], tokens["heldout"], info)


def is_heldout(index: int, holdout_every: int) -> bool:
    return holdout_every > 0 and index % holdout_every == holdout_every - 1


def spread_timesteps(count: int, num_train_timesteps: int = 1000) -> list[int]:
    """``count`` timesteps at the centres of equal bins of [0, T): 4 -> 125, 375, 625, 875."""
    return [int((i + 0.5) * num_train_timesteps / count) for i in range(count)]


def _encode(model: StableDiffusionModel, captions: list[str], max_token_length, clip_skip) -> torch.Tensor:
    ids = tokenize_captions(model.tokenizer, captions, max_token_length)
    return encode_tokens(model.text_encoder, ids, clip_skip=clip_skip)


@torch.no_grad()
def calibrate_on_dataset(
    model: StableDiffusionModel,
    group: DatasetGroup,
    recorder: FFNRecorder,
    *,
    timesteps: int,
    holdout_every: int,
    max_batches: int | None = None,
    clip_skip: int | None = None,
    seed: int = 0,
) -> int:
    """Run each batch at ``timesteps`` noise levels, with its captions and with empty ones; returns batches run."""
    unet, scheduler = model.unet, model.noise_scheduler
    group.set_current_epoch(1)
    generator = torch.Generator().manual_seed(seed)
    batches = len(group) if max_batches is None else min(len(group), max_batches)
    for index in range(batches):
        batch = group[index]
        recorder.heldout = is_heldout(index, holdout_every)
        latents = batch_latents(batch, model.vae, dtype=torch.float32)
        size = latents.shape[0]
        captions = _encode(model, batch["captions"], group.max_token_length, clip_skip)
        empty = _encode(model, [""] * size, group.max_token_length, clip_skip)
        context = torch.cat([captions, empty]).to(unet.device, unet.dtype)
        for t in spread_timesteps(timesteps, scheduler.config.num_train_timesteps):
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            noisy = scheduler.add_noise(latents, noise, torch.full((size,), t, dtype=torch.long))
            noisy = torch.cat([noisy, noisy]).to(unet.device, unet.dtype)
            unet(noisy, torch.full((2 * size,), t, device=unet.device), context)
    return batches


@torch.no_grad()
def calibrate_on_prompts(
    model: StableDiffusionModel,
    prompts: Sequence[SamplePrompt],
    recorder: FFNRecorder,
    *,
    holdout_every: int,
    default_sampler: str = "ddim",
    clip_skip: int | None = None,
    seed: int = 0,
) -> int:
    """Sample each prompt as ``--sample_prompts`` would (latents only); returns prompts run."""
    for index, prompt in enumerate(prompts):
        recorder.heldout = is_heldout(index, holdout_every)
        pipeline = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.unet,
            scheduler=make_sampler(prompt.sampler or default_sampler, model.v_parameterization),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        embeds = _encode(model, [prompt.prompt, prompt.negative_prompt], None, clip_skip).to(model.unet.dtype)
        pipeline(
            prompt_embeds=embeds[:1],
            negative_prompt_embeds=embeds[1:],
            width=prompt.width,
            height=prompt.height,
            num_inference_steps=prompt.sample_steps,
            guidance_scale=prompt.scale,
            generator=torch.Generator().manual_seed(prompt.seed if prompt.seed is not None else seed + index),
            output_type="latent",
        )
    return len(prompts)


@torch.no_grad()
def relative_errors(
    network: LowRankFFNNetwork, inputs: dict[str, torch.Tensor], chunk: int = 8192
) -> dict[str, float]:
    """``|y - y'|_F / |y|_F`` per FFN over ``inputs``: original output y, narrow output y'."""
    errors = {}
    for module in network.ffn_modules:
        tokens = inputs.get(module.lora_name)
        if tokens is None or not len(tokens):
            continue
        weight = ffn_layers(module.lora_name, module.original)[0].weight
        squared_error = squared_norm = 0.0
        for x in tokens.split(chunk):
            x = x.to(weight.device, weight.dtype)
            y = module.reference(x).double()
            squared_error += (y - module.narrow(x).double()).square().sum().item()
            squared_norm += y.square().sum().item()
        errors[module.lora_name] = math.sqrt(squared_error / max(squared_norm, 1e-300))
    return errors


def calibrate(
    model: StableDiffusionModel,
    ffns: Mapping[str, torch.nn.Module],
    *,
    run_sources: Callable[[FFNRecorder], dict],
    tokens: int,
    seed: int = 0,
) -> Calibration:
    """Record ``ffns`` while ``run_sources(recorder)`` runs the UNet; its returned dict describes the run."""
    with FFNRecorder(ffns, tokens, seed) as recorder:
        info = run_sources(recorder)
    return recorder.result({"source": model.source, **info})
