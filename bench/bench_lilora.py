"""Light LoRA against LoRA: trainable parameters, file sizes, build time and step time, in one run.

    python -m bench.bench_lilora                  # SD1.5 shapes (meta device) + tiny-fixture steps
    python -m bench.bench_lilora --ranks 1 4 8 --steps 30

SD1.5 figures use the real SD1.5 text encoder and UNet shapes on the meta device (no weights), with
kohya's default targets (264 modules; ``--conv`` adds LoCon's). Step time is a full training step
(text encoder + UNet forward, backward, AdamW) of the tiny fixture model with each network, the same
batches, interleaved runs, median of repeats; ``--sd15_steps N`` adds N steps of an SD1.5-sized
random model at 256 px. One thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from library.models.sd_configs import CLIP_L_TEXT, SD15_UNET  # noqa: E402
from library.models.stable_diffusion import load_stable_diffusion  # noqa: E402
from library.tiny_sd import write_tiny_sd  # noqa: E402
from networks import lilora, lora  # noqa: E402

KB = 1000


def trainable(network) -> int:
    return sum(p.numel() for p in network.get_trainable_params())


def file_kb(network, folder: Path, name: str, dtype) -> float:
    path = folder / name
    network.save_weights(path, dtype, {})
    return path.stat().st_size / KB


def sd15_figures(ranks: list[int], conv: bool) -> None:
    with init_empty_weights():
        text_encoder, unet = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), UNet2DConditionModel(**SD15_UNET)
    extra = {"conv_dim": "4", "conv_alpha": "1"} if conv else {}
    print(f"SD1.5 shapes, kohya targets{' + LoCon 3x3 (conv_dim 4)' if conv else ''}, aux_down 100, aux_up 50")
    columns = ["rank", "network", "modules", "trainable params", "vs LoRA", "file fp16 (KB)", "file fp32 (KB)"]
    columns += ["aux buffers (MB)", "build (s)"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for rank in ranks:
            start = time.perf_counter()
            base = lora.create_network(1.0, rank, rank, None, text_encoder, unet, **extra)
            built = time.perf_counter() - start
            reference = trainable(base)
            sizes = [file_kb(base, folder, "lora.safetensors", dtype) for dtype in (torch.float16, None)]
            print(f"| {rank} | LoRA | {len(base.adapters)} | {reference:,} | 1 | ", end="")
            print(f"{sizes[0]:,.0f} | {sizes[1]:,.0f} | 0 | {built:.2f} |")
            for init in ("up_zero", "joint"):
                start = time.perf_counter()
                network = lilora.create_network(1.0, rank, rank, None, text_encoder, unet, init=init, **extra)
                built = time.perf_counter() - start
                aux = sum(b.numel() * b.element_size() for b in network.buffers() if b.dim() == 2) / 1e6
                sizes = [file_kb(network, folder, "x.lilora.safetensors", dtype) for dtype in (torch.float16, None)]
                count = trainable(network)
                print(
                    f"| {rank} | Light LoRA {init}, compact | {len(network.adapters)} | {count:,} | "
                    f"{count / reference:.3f} | {sizes[0]:,.0f} | {sizes[1]:,.0f} | {aux:,.0f} | {built:.2f} |"
                )
            standard = file_kb(network, folder, "standard.safetensors", torch.float16)
            print(f"| {rank} | Light LoRA, standard file | | | | {standard:,.0f} | | | |")
    print()
    network = lilora.create_network(1.0, ranks[-1], 1, None, text_encoder, unet, **extra)
    flops = sum(2 * m.lora_dim * (m.down_aux.numel() + m.up_aux.numel()) for m in network.adapters)
    print(f"Light LoRA's extra work per training step at SD1.5 shapes, rank {ranks[-1]}: multiplying out every")
    print(f"lora_down/lora_up, {flops / 1e9:.2f} GFLOP forward and twice that backward (a LoRA has these as")
    print(f"weights), {factor_overhead(network) * 1e3:.0f} ms here.")
    print()


def factor_overhead(network, repeats: int = 5) -> float:
    """Seconds to multiply out every module's factors and back-propagate through the products."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total = sum(module.down_weight().sum() + module.up_weight().sum() for module in network.adapters)
        total.backward()
        times.append(time.perf_counter() - start)
        network.zero_grad()
    return statistics.median(times)


def step_times(text_encoder, unet, batches, rank: int, repeats: int) -> dict[str, float]:
    """Median seconds per training step (text encoder + UNet forward, backward, AdamW) with each network."""
    text_encoder.requires_grad_(False)  # frozen, as in training: only the network gets gradients
    unet.requires_grad_(False)
    timesteps = torch.linspace(100, 900, batches[0][1].shape[0]).long()

    def make(module, **args):
        network = module.create_network(1.0, rank, rank, None, text_encoder, unet, **args)
        params, _ = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
        return network, torch.optim.AdamW(params)

    def run(network, optimizer) -> float:
        network.apply_to(text_encoder, unet)  # patched forwards only; the modules stay in the network
        start = time.perf_counter()
        for ids, latents in batches:
            loss = unet(latents, timesteps, text_encoder(ids)[0]).sample.square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        elapsed = (time.perf_counter() - start) / len(batches)
        network.restore()
        return elapsed

    contenders = {
        "LoRA": make(lora),
        "Light LoRA up_zero": make(lilora),
        "Light LoRA joint": make(lilora, init="joint"),
    }
    times = {name: [] for name in contenders}
    for _ in range(repeats):  # interleaved, so a busy neighbour slows every contender alike
        for name, (network, optimizer) in contenders.items():
            times[name].append(run(network, optimizer))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        print(f"  {name:<20} {median * 1e3:9.1f} ms/step  x{median / medians['LoRA']:.2f} vs LoRA")
    return medians


def random_batches(count: int, batch: int, latent_size: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, vocab, (batch, 77), generator=generator),
            torch.randn(batch, 4, latent_size, latent_size, generator=generator),
        )
        for _ in range(count)
    ]


def tiny_step_times(steps: int, repeats: int, rank: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = load_stable_diffusion(write_tiny_sd(Path(tmp), seed=0).sd1_dir)
    print(f"Training step on the tiny SD1 fixture (batch 4, 64 px, rank {rank}, AdamW), median of {repeats}:")
    step_times(model.text_encoder, model.unet, random_batches(steps, 4, 8, 100), rank, repeats)
    print()


def sd15_step_times(steps: int, repeats: int, rank: int) -> None:
    torch.manual_seed(0)
    text_encoder, unet = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), UNet2DConditionModel(**SD15_UNET)
    print(f"Training step of an SD1.5-sized random model (batch 1, 256 px, rank {rank}, fp32), median of {repeats}:")
    step_times(text_encoder, unet, random_batches(steps, 1, 32, 1000), rank, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--conv", action="store_true", help="also LoCon's 3x3 convs (conv_dim 4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sd15_steps", type=int, default=0, help="also time SD1.5-sized steps (slow on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    sd15_figures(args.ranks, args.conv)
    tiny_step_times(args.steps, args.repeats, rank=4)
    if args.sd15_steps:
        sd15_step_times(args.sd15_steps, args.repeats, rank=4)


if __name__ == "__main__":
    main()
