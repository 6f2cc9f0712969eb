"""One LoRA step of sdxl_train_network.py on a real-size SDXL-shaped random checkpoint (2.6B UNet).

    flock /work/bigmem.lock python -m bench.bench_sdxl_full_size            # 128 px, CPU if no GPU
    python -m bench.bench_sdxl_full_size --size 256 --work_dir /fast/disk

Writes (once) an fp16 single file in the SGM layout with SDXL 1.0's shapes (UNet 2.57B, CLIP-L,
OpenCLIP bigG, VAE), built in float16 so that building it needs about 7 GB rather than 14, then
runs ``sdxl_train_network.py`` for two LoRA steps with ``--cache_latents
--cache_text_encoder_outputs --network_train_unet_only --mixed_precision bf16``. It prints the
child's wall time, the time of each step (the first one includes the first-call set-up; timed
inside the child) and the child's peak resident memory (``wait4``'s ``ru_maxrss``). Not a test:
it shows that a real-size SDXL model loads, caches and trains within one machine's memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train_step import common_flags  # noqa: E402

STEP_TIMES_MARK = "bench step times: "


def write_random_sdxl(checkpoint: Path, tokenizers: Path) -> None:
    """SDXL 1.0-shaped random weights as one fp16 SGM file, tokenizers in kohya's cache layout."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.families import make_training_scheduler
    from library.models.sd_configs import CLIP_L_TEXT, OPEN_CLIP_BIGG_TEXT, SD_VAE, SDXL_UNET
    from library.models.sdxl import SDXL, SDXLModel, save_sgm_checkpoint
    from library.models.sgm_conversion import SDXL_VAE_SCALE_FACTOR
    from library.tiny_parts import write_tiny_tokenizer

    print(f"writing an SDXL-sized random checkpoint to {checkpoint} ...", flush=True)
    tokenizer = write_tiny_tokenizer(tokenizers / SDXL.tokenizer_folder, v2=False)
    tokenizer_2 = write_tiny_tokenizer(tokenizers / SDXL.tokenizer_2_folder, v2=True)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # half the memory of building in float32 and casting
    try:
        unet = UNet2DConditionModel(**SDXL_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG_TEXT))
        vae = AutoencoderKL(**{**SD_VAE, "scaling_factor": SDXL_VAE_SCALE_FACTOR})
    finally:
        torch.set_default_dtype(default_dtype)
    params = sum(p.numel() for p in unet.parameters())
    print(f"UNet parameters: {params / 1e9:.3f} B", flush=True)
    model = SDXLModel(
        text_encoder, text_encoder_2, vae, unet, tokenizer, tokenizer_2, make_training_scheduler(False), "random"
    )
    save_sgm_checkpoint(model, checkpoint, dtype=torch.float16)  # written atomically
    del model, unet, text_encoder, text_encoder_2, vae
    gc.collect()  # the training child needs the memory


def write_images(data: Path, size: int, images: int) -> None:
    import numpy as np
    from PIL import Image

    folder = data / "1_bench"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(images):
        Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of bench toy")


def train_flags(checkpoint: Path, tokenizers: Path, data: Path, out: Path, size: int, steps: int) -> list[str]:
    """bench_train_step's LoRA run in bf16, with SDXL's cached text-encoder outputs and UNet-only training."""
    flags = common_flags(checkpoint, tokenizers, data, out, size, steps, mixed_precision="bf16")
    return [*flags, "--cache_text_encoder_outputs", "--network_train_unet_only"]


def child(argv: list[str]) -> None:
    """Run sdxl_train_network.py in this process with each step timed (start of step to its log)."""
    import sdxl_train_network
    from library.training.loop import TrainingRun
    from library.training.network_trainer import NetworkTask

    starts, ends = [], []
    on_step_start, log_step = NetworkTask.on_step_start, TrainingRun._log_step

    def timed_start(self, step):
        starts.append(time.perf_counter())
        return on_step_start(self, step)

    def timed_log(self, values):
        ends.append(time.perf_counter())
        return log_step(self, values)

    NetworkTask.on_step_start, TrainingRun._log_step = timed_start, timed_log
    sdxl_train_network.main(argv)
    print(STEP_TIMES_MARK + json.dumps([end - start for start, end in zip(starts, ends)]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "sd-lite-bench-sdxl")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(rest)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizers, data = (
        args.work_dir / "sdxl_random.safetensors", args.work_dir / "tokenizers", args.work_dir / "img",
    )  # fmt: skip
    if not checkpoint.exists():
        # In a child process: Linux carries a process' peak RSS over fork and exec, so the trainer's
        # figure below would be at least the ~8 GiB this writer peaks at.
        started = time.perf_counter()
        code = "from bench.bench_sdxl_full_size import write_random_sdxl as write; from pathlib import Path; "
        code += f"write(Path({str(checkpoint)!r}), Path({str(tokenizers)!r}))"
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
        print(f"written in {time.perf_counter() - started:.0f} s ({checkpoint.stat().st_size / 2**30:.2f} GiB)")
    write_images(data, args.size, images=2)
    flags = train_flags(checkpoint, tokenizers, data, args.work_dir / "out", args.size, args.steps)
    command = [sys.executable, "-m", "bench.bench_sdxl_full_size", "--child", *flags]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the only child this process waited for
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"sdxl_train_network.py failed:\n{stderr[-3000:]}")
    steps = next(
        json.loads(line[len(STEP_TIMES_MARK) :]) for line in stdout.splitlines() if line.startswith(STEP_TIMES_MARK)
    )
    print(f"resolution {args.size} px, {args.steps} steps: wall {wall:.1f} s (load, cache, train, save)")
    print("step times: " + ", ".join(f"{t:.2f} s" for t in steps))
    print(f"peak RSS of the child: {usage.ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
