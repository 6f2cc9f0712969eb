"""CPU levers that leave the maths alone, timed on one SD1.5-shaped LoRA step (UNet forward and backward).

    python -m bench.bench_cpu_levers                    # eager, channels_last, narrow weights, fused AdamW
    python -m bench.bench_cpu_levers --levers eager inductor --rounds 3
    python -m bench.bench_cpu_levers --levers eager narrow narrow_low_f32 narrow_lower_f32 --rounds 5

Every lever runs the same step in the same process, interleaved round by round against the eager
float32 baseline (medians, ratios printed): a random SD1.5 UNet (fp16-rounded weights, so the narrow
variant is exact) at ``--size`` px, batch 1, gradients flowing back through every layer as they do
to a LoRA. ``channels_last``: model and input in NHWC. ``narrow``: frozen weights kept in fp16 and
widened per use (``library.models.narrow_weights``, the trainer's default in float32 runs).
``narrow_low_f32`` / ``narrow_lower_f32``: the same, but the lowest-resolution blocks (4x4 latents
at 256 px, whose convs are bound by reading their weights), then also the level above, keep float32
copies: what memory buys back of the widening's cost (docs/training.md). Each row prints the UNet
weights' size.
``inductor``: ``torch.compile`` (kohya's ``--torch_compile --dynamo_backend inductor``), its
compile time printed apart. ``fused_adamw``: one AdamW step over a LoRA dim 16's 6.8 M parameters,
``fused=True`` against the default ``foreach``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Blocks kept in float32 by the partly narrow levers.
FLOAT32_BLOCKS = {
    "narrow": (),
    "narrow_low_f32": ("down_blocks.3", "mid_block", "up_blocks.0"),
    "narrow_lower_f32": ("down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0"),
}
STEP_LEVERS = ("eager", "channels_last", *FLOAT32_BLOCKS, "inductor")
LORA_DIM16_PARAMS = 6_782_976  # trainable parameters of the bench's LoRA (train_network's log)


def build_unet():
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.models.sd_configs import SD15_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).half().float().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def variant(base, lever: str):
    """(model, input memory format, seconds spent compiling) for ``lever``."""
    import torch

    from library.models.narrow_weights import keep_weights_narrow

    if lever == "eager":
        return base, torch.contiguous_format, 0.0
    model = copy.deepcopy(base)
    if lever == "channels_last":
        return model.to(memory_format=torch.channels_last), torch.channels_last, 0.0
    if lever in FLOAT32_BLOCKS:
        model.half()
        for name in FLOAT32_BLOCKS[lever]:
            model.get_submodule(name).float()
        keep_weights_narrow(model, torch.float32)
        return model, torch.contiguous_format, 0.0
    compiled = torch.compile(model, backend="inductor")
    return compiled, torch.contiguous_format, None  # compile time: the first step's


def weights_gib(model) -> float:
    """The size of ``model``'s parameters as held (narrow ones at 2 bytes)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def one_step(model, size: int, memory_format) -> float:
    import torch

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=generator).contiguous(memory_format=memory_format)
    context = torch.randn(1, 77, 768, generator=generator)
    latents.requires_grad_(True)  # gradients through every layer, as to a LoRA in the first block
    start = time.perf_counter()
    model(latents, torch.tensor([500]), context).sample.pow(2).mean().backward()
    return time.perf_counter() - start


def time_fused_adamw(rounds: int) -> dict[str, float]:
    """Seconds per AdamW step, ``foreach`` (the default) and ``fused``, over 384 factors (192 modules'
    down and up) holding the bench LoRA's 6.8 M parameters."""
    import torch

    times: dict[str, list[float]] = {"foreach": [], "fused": []}
    for name in times:
        params = [torch.nn.Parameter(torch.randn(16, LORA_DIM16_PARAMS // (384 * 16))) for _ in range(384)]
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=name == "fused")
        optimizer.step()
        for _ in range(rounds * 5):
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="+", default=["eager", "channels_last", "narrow", "fused_adamw"],
                        choices=[*STEP_LEVERS, "fused_adamw"])  # fmt: skip
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size} px, batch 1", flush=True)
    step_levers = ["eager"] + [lever for lever in args.levers if lever in STEP_LEVERS and lever != "eager"]
    base = build_unet()
    models = {lever: variant(base, lever) for lever in step_levers}
    compile_seconds = {}
    for lever, (model, memory_format, compiling) in models.items():  # warm-up (and compilation)
        seconds = one_step(model, args.size, memory_format)
        if compiling is None:
            compile_seconds[lever] = seconds
    times: dict[str, list[float]] = {lever: [] for lever in models}
    for _ in range(args.rounds):
        for lever, (model, memory_format, _) in models.items():
            times[lever].append(one_step(model, args.size, memory_format))
    baseline = statistics.median(times["eager"])
    print(f"{'lever':16} {'s/step':>8} {'vs eager':>9} {'weights GiB':>12}")
    for lever, values in times.items():
        median = statistics.median(values)
        extra = f"  (first step, compiling: {compile_seconds[lever]:.0f} s)" if lever in compile_seconds else ""
        size = weights_gib(models[lever][0])
        print(f"{lever:16} {median:8.2f} {median / baseline:8.2f}x {size:12.2f}{extra}", flush=True)
    if "fused_adamw" in args.levers:
        adamw = time_fused_adamw(args.rounds)
        print(
            f"AdamW step over {LORA_DIM16_PARAMS / 1e6:.1f} M parameters: foreach {adamw['foreach'] * 1e3:.1f} ms,"
            f" fused {adamw['fused'] * 1e3:.1f} ms (x{adamw['fused'] / adamw['foreach']:.2f});"
            f" against a {baseline:.2f} s step",
            flush=True,
        )


if __name__ == "__main__":
    main()
