"""LoRA training step time and peak memory on an SD1.5-sized random model (CPU by default).

    python -m bench.bench_train_step                      # this suite only
    python -m bench.bench_train_step --kohya_dir ~/sd-scripts --kohya_python ~/sd-scripts/venv/bin/python

Both trainers get the same single-file checkpoint, tokenizer folder, images and flags (256 px,
batch 1, LoRA dim 16, AdamW, cached latents, SDPA, fp32). Each runs once to warm up (the
checkpoint then sits in the page cache for both), then with few and with more steps; the difference
divided by the extra steps is the time of one training step, free of start-up and model loading.
Peak memory is the child process' maximum resident set size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_random_sd15(checkpoint: Path, tokenizers: Path, dtype=None) -> None:
    """An SD1.5-shaped random single-file checkpoint (fp16 by default) and the tokenizer folder it names."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.families import SD1, make_training_scheduler
    from library.models.sd_configs import CLIP_L_TEXT, SD15_UNET, SD_VAE
    from library.models.stable_diffusion import StableDiffusionModel, save_ldm_checkpoint
    from library.tiny_sd import write_tiny_tokenizer

    print(f"writing an SD1.5-sized random checkpoint to {checkpoint} ...", flush=True)
    torch.manual_seed(0)
    tokenizer = write_tiny_tokenizer(tokenizers / SD1.tokenizer_folder, v2=False)
    model = StableDiffusionModel(
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
        vae=AutoencoderKL(**SD_VAE),
        unet=UNet2DConditionModel(**SD15_UNET),
        tokenizer=tokenizer,
        noise_scheduler=make_training_scheduler(False),
        v2=False,
        v_parameterization=False,
        source="random",
    )
    save_ldm_checkpoint(model, checkpoint, dtype=torch.float16 if dtype is None else dtype)


def make_inputs(work: Path, size: int, images: int) -> tuple[Path, Path, Path]:
    """SD1.5-shaped random checkpoint (fp16 single file), tokenizer folder and a small dataset."""
    import numpy as np
    from PIL import Image

    checkpoint = work / "sd15_random.safetensors"
    tokenizers = work / "tokenizers"
    data = work / "img"
    if not checkpoint.exists():
        write_random_sd15(checkpoint, tokenizers)
    folder = data / "10_bench"
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.RandomState(0)
        for i in range(images):
            Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("a photo of bench toy")
    return checkpoint, tokenizers, data


def common_flags(
    checkpoint: Path, tokenizers: Path, data: Path, out: Path, size: int, steps: int, mixed_precision: str = "no"
) -> list[str]:
    """The LoRA run every benchmark times: dim 16, AdamW, batch 1, cached latents, SDPA."""
    return [
        "--pretrained_model_name_or_path", str(checkpoint),
        "--tokenizer_cache_dir", str(tokenizers),
        "--train_data_dir", str(data),
        "--caption_extension", ".txt",
        "--resolution", str(size),
        "--output_dir", str(out),
        "--output_name", "bench",
        "--network_module", "networks.lora",
        "--network_dim", "16",
        "--network_alpha", "8",
        "--learning_rate", "1e-4",
        "--optimizer_type", "AdamW",
        "--max_train_steps", str(steps),
        "--train_batch_size", "1",
        "--cache_latents",
        "--sdpa",
        "--mixed_precision", mixed_precision,
        "--seed", "0",
        "--max_data_loader_n_workers", "0",
    ]  # fmt: skip


def timed_run(command: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{process.stderr.read().decode()[-3000:]}")
    return elapsed, usage.ru_maxrss / 2**20


def measure(name: str, command_for, cwd: Path, few: int, many: int) -> dict:
    timed_run(command_for(1), cwd)  # warm-up: reads the checkpoint into the page cache, writes the latent cache
    t_few, rss_few = timed_run(command_for(few), cwd)
    t_many, rss_many = timed_run(command_for(many), cwd)
    step = (t_many - t_few) / (many - few)
    print(
        f"{name:>8}: {step:6.2f} s/step ({1 / step:.3f} it/s), peak RSS {max(rss_few, rss_many):.2f} GiB", flush=True
    )
    return {"step": step, "rss": max(rss_few, rss_many)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "sd-lite-bench")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--few", type=int, default=2, help="steps of the short run")
    parser.add_argument("--many", type=int, default=8, help="steps of the long run")
    parser.add_argument("--kohya_dir", type=Path, help="a kohya sd-scripts checkout to compare with")
    parser.add_argument("--kohya_python", type=str, help="the python of kohya's environment")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizers, data = make_inputs(args.work_dir, args.size, images=4)

    def ours(steps: int) -> list[str]:
        flags = common_flags(checkpoint, tokenizers, data, args.work_dir / "out-ours", args.size, steps)
        return [sys.executable, str(REPO / "train_network.py"), *flags]

    results = {"this suite": measure("ours", ours, REPO, args.few, args.many)}
    if args.kohya_dir:

        def kohya(steps: int) -> list[str]:
            flags = common_flags(checkpoint, tokenizers, data, args.work_dir / "out-kohya", args.size, steps)
            return [args.kohya_python or sys.executable, str(args.kohya_dir / "train_network.py"), *flags]

        results["kohya"] = measure("kohya", kohya, args.kohya_dir, args.few, args.many)
        a, b = results["this suite"], results["kohya"]
        print(f"kohya/ours: step time x{b['step'] / a['step']:.2f}, peak memory x{b['rss'] / a['rss']:.2f}")


if __name__ == "__main__":
    main()
