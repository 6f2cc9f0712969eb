"""Sample images during training from kohya's prompt files.

A prompt file is ``.txt`` (one prompt per line, ``#`` comments, options ``--n`` negative prompt,
``--w``/``--h`` size, ``--s`` steps, ``--l`` CFG scale, ``--d`` seed, ``--ss`` sampler), ``.toml``
(``[prompt]`` defaults with ``[[prompt.subset]]`` entries) or ``.json`` (a list of strings or
dicts), as in kohya's sd-scripts. Prompts take kohya's ``(word:1.2)``/``[word]`` weighting
(:func:`library.models.prompt_weighting.encode_sample_prompts`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import toml
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

from library.errors import ConfigError
from library.models.narrow_weights import place_keeping_narrow
from library.models.prompt_weighting import encode_sample_prompts
from library.models.stable_diffusion import StableDiffusionModel

logger = logging.getLogger(__name__)

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
SAMPLER_ALIASES = {f"k_{name}": name for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    sample_steps: int = 30
    scale: float = 7.5
    seed: int | None = None
    sampler: str | None = None


def _clamp_size(value: int) -> int:
    return max(64, value - value % 8)


def parse_prompt_line(line: str) -> SamplePrompt:
    """kohya's ``prompt --n negative --w 512 --h 512 --s 30 --l 7.5 --d 42 --ss euler_a``."""
    parts = line.split(" --")
    fields: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        option, _, value = part.strip().partition(" ")
        value = value.strip()
        try:
            if option == "n":
                fields["negative_prompt"] = value
            elif option == "w":
                fields["width"] = _clamp_size(int(value))
            elif option == "h":
                fields["height"] = _clamp_size(int(value))
            elif option == "s":
                fields["sample_steps"] = min(1000, max(1, int(value)))
            elif option == "l":
                fields["scale"] = float(value)
            elif option == "d":
                fields["seed"] = int(value)
            elif option == "ss":
                fields["sampler"] = value
            else:
                logger.warning("sample prompt option --%s is not used for SD1.x/SD2.x and is ignored", option)
        except ValueError as err:
            raise ConfigError(f"sample prompt option --{option} has a bad value {value!r}: {line!r}") from err
    return SamplePrompt(**fields)


def _from_dict(entry: dict, defaults: SamplePrompt) -> SamplePrompt:
    names = {"prompt", "negative_prompt", "width", "height", "sample_steps", "scale", "seed"}
    known = {k: v for k, v in entry.items() if k in names}
    if "sample_sampler" in entry:
        known["sampler"] = entry["sample_sampler"]
    unknown = set(entry) - names - {"sample_sampler", "enum"}
    if unknown:
        raise ConfigError(f"sample prompt keys not understood: {', '.join(sorted(unknown))}")
    prompt = replace(defaults, **known)
    return replace(prompt, width=_clamp_size(prompt.width), height=_clamp_size(prompt.height))


def load_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Read a kohya prompt file (.txt, .toml or .json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sample_prompts '{path}' does not exist")
    if path.suffix == ".toml":
        data = toml.load(path).get("prompt", {})
        defaults = _from_dict({k: v for k, v in data.items() if k != "subset"} | {"prompt": ""}, SamplePrompt(""))
        return [_from_dict(entry, defaults) for entry in data.get("subset", [])]
    if path.suffix == ".json":
        entries = json.loads(path.read_text(encoding="utf-8"))
        return [parse_prompt_line(e) if isinstance(e, str) else _from_dict(e, SamplePrompt("")) for e in entries]
    lines = path.read_text(encoding="utf-8").splitlines()
    return [parse_prompt_line(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def make_sampler(name: str, v_parameterization: bool):
    """A diffusers scheduler for kohya's sampler name, on SD's training noise schedule."""
    name = SAMPLER_ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise ConfigError(f"--sample_sampler '{name}' is unknown (known: {', '.join(sorted(SAMPLERS))})")
    class_name, extra = SAMPLERS[name]
    scheduler_class = getattr(diffusers, class_name)
    if "steps_offset" in inspect.signature(scheduler_class.__init__).parameters:
        extra = {**extra, "steps_offset": 1}  # SD's released scheduler configs use 1
    return scheduler_class(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        **extra,
    )


def sample_file_name(output_name: str | None, prompt_index: int, seed: int | None, *, epoch=None, step=0) -> str:
    """kohya's ``<name>_<e000001|000500>_<ii>_<timestamp>[_seed].png``."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    seed_suffix = f"_{seed}" if seed is not None else ""
    return f"{prefix}{number}_{prompt_index:02d}_{time.strftime('%Y%m%d%H%M%S')}{seed_suffix}.png"


def float32_decode(vae: torch.nn.Module) -> Callable[[DiffusionPipeline, torch.Tensor], Image.Image]:
    """Decode a pipeline's latents with ``vae`` in float32 outside the run's autocast.

    The pipelines' own decode casts nothing: float16 latents (an fp16 run) into a float32 VAE fail
    on the CPU, and under autocast the VAE would run in half precision (SDXL's overflows in fp16).
    """

    def decode(pipeline: DiffusionPipeline, latents: torch.Tensor) -> Image.Image:
        with torch.autocast(latents.device.type, enabled=False):
            image = vae.decode(latents.to(vae.device, torch.float32) / vae.config.scaling_factor).sample
        return pipeline.image_processor.postprocess(image, output_type="pil")[0]

    return decode


def generate_samples(
    components: dict,
    prompts: list[SamplePrompt],
    encode_prompts: Callable[[list[str]], torch.Tensor],
    **options,
) -> list[Path]:
    """SD1/SD2 samples: ``encode_prompts([prompt, negative])`` gives both prompts' embeddings."""

    def build(scheduler) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            **components, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip

    def inputs(prompt: SamplePrompt) -> dict:
        embeds = encode_prompts([prompt.prompt, prompt.negative_prompt])
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}

    return draw_samples(build, inputs, prompts, decode=float32_decode(components["vae"]), **options)


def draw_samples(
    build_pipeline: Callable[[object], DiffusionPipeline],
    pipeline_inputs: Callable[[SamplePrompt], dict],
    prompts: list[SamplePrompt],
    *,
    default_sampler: str,
    v_parameterization: bool,
    out_dir: Path,
    output_name: str | None,
    epoch: int | None,
    step: int,
    device: torch.device,
    decode: Callable[[DiffusionPipeline, torch.Tensor], Image.Image] | None = None,
) -> list[Path]:
    """Render each prompt with the current weights and save PNGs; training RNG is left untouched.

    ``build_pipeline(scheduler)`` is the family's diffusers pipeline over the loaded components and
    ``pipeline_inputs(prompt)`` its prompt embeddings (and, for SDXL, pooled text and size numbers).
    ``decode(pipeline, latents)``, if given, turns the pipeline's latents into the image.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for index, prompt in enumerate(prompts):
            scheduler = make_sampler(prompt.sampler or default_sampler, v_parameterization)
            with warnings.catch_warnings():
                # DDIM/PNDM keep clip_sample=True as in kohya's samplers; the pipeline's advice against
                # it (a FutureWarning printed with the whole scheduler config) is not for our users.
                warnings.filterwarnings("ignore", message="(?s).*clip_sample", category=FutureWarning)
                pipeline = build_pipeline(scheduler)
            pipeline.set_progress_bar_config(disable=True)
            generator = torch.Generator(device="cpu")
            generator.manual_seed(prompt.seed if prompt.seed is not None else torch.seed())
            output = pipeline(
                **pipeline_inputs(prompt),
                width=prompt.width,
                height=prompt.height,
                num_inference_steps=prompt.sample_steps,
                guidance_scale=prompt.scale,
                generator=generator,
                **({"output_type": "latent"} if decode else {}),
            )
            image = decode(pipeline, output.images) if decode else output.images[0]
            path = out_dir / sample_file_name(output_name, index, prompt.seed, epoch=epoch, step=step)
            image.save(path)
            written.append(path)
    return written


def render_samples(
    args: argparse.Namespace,
    device: torch.device,
    model: StableDiffusionModel,
    unet: torch.nn.Module,
    prompts: list[SamplePrompt],
    epoch: int | None,
    step: int,
) -> list[tuple[Path, str]]:
    """kohya's sample images with ``unet`` (e.g. with a network patched in, or a student): (file, prompt) pairs."""
    vae_place = (model.vae.device, model.vae.dtype)
    place_keeping_narrow(model.vae, device, torch.float32)
    components = {"vae": model.vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer, "unet": unet}

    def encode_chunk(ids: torch.Tensor) -> torch.Tensor:
        return model.encode_prompt(ids[:, None], args.clip_skip)

    def encode(texts: list[str]) -> torch.Tensor:  # kohya's (word:1.2) weighting, up to 225 tokens
        return encode_sample_prompts(model.tokenizer, encode_chunk, texts).to(unet.dtype)

    try:
        paths = generate_samples(
            components,
            prompts,
            encode,
            default_sampler=args.sample_sampler,
            v_parameterization=model.v_parameterization,
            out_dir=Path(args.output_dir) / "sample",
            output_name=args.output_name,
            epoch=epoch,
            step=step,
            device=device,
        )
    finally:
        place_keeping_narrow(model.vae, *vae_place)
    return list(zip(paths, [prompt.prompt for prompt in prompts]))
