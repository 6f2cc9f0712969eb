"""LoRA training step time and peak memory on an SD1.5-sized random model (CPU by default).

    python -m bench.bench_train_step                      # this suite only
    python -m bench.bench_train_step --kohya_dir ~/sd-scripts --kohya_python ~/sd-scripts/venv/bin/python

kohya's child runs with ``--extra_path`` (default: ``bench/kohya_torchvision``, a torchvision stand-in
for the three transforms kohya's training calls) on its PYTHONPATH, ours never; docs/training.md
("Measured: memory and start-up") gives the commands that build kohya's venv.

Both trainers get the same single-file checkpoint, tokenizer folder, images and flags (256 px,
batch 1, LoRA dim 16, AdamW, cached latents, SDPA, UNet only, fp32). Each runs once to warm up (the
checkpoint then sits in the page cache for both), then, in interleaved rounds, with few and with
more steps; the difference of the time after the first step began, divided by the extra steps, is
the time of one training step, free of start-up and model loading. Start-up is the wall time to
the first step (the ``steps:`` progress bar); peak memory is the child process' maximum resident set size (``wait4``).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def timed_run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(seconds to the first step, total seconds, peak RSS in GiB) of one child process.

    The first step is when the training loop's progress bar (``steps:``, both trainers) appears:
    everything before it (imports, loading, latent caching, network, optimizer) is start-up.
    ``env``: the child's whole environment (default: ours).
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_step, tail = None, b""
    while chunk := process.stderr.read1(4096):
        tail = (tail + chunk)[-20000:]
        if first_step is None and b"steps:" in tail:
            first_step = time.perf_counter() - start
    _, status, usage = os.wait4(process.pid, 0)
    total = time.perf_counter() - start
    if status != 0 or first_step is None:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{tail.decode(errors='replace')[-3000:]}")
    return first_step, total, usage.ru_maxrss / 2**20


def child_env(extra_path: str) -> dict[str, str]:
    """Our environment with ``extra_path`` (os.pathsep-separated folders) in front of PYTHONPATH.

    For kohya's child only: its venv lacks a torchvision that loads beside torch 2.13 CPU.
    """
    env = dict(os.environ)
    path = os.pathsep.join(p for p in (extra_path, env.pop("PYTHONPATH", "")) if p)
    if path:
        env["PYTHONPATH"] = path
    return env


def measure(
    tools: dict, cwd: dict, few: int, many: int, rounds: int, env: dict | None = None
) -> dict[str, dict[str, float]]:
    """Step time, start-up and peak RSS per tool, the tools interleaved round by round (medians).

    ``env``: a child environment per tool name (tools not named get ours).
    """
    env = env or {}

    def run(name: str, steps: int) -> tuple[float, float, float]:
        return timed_run(tools[name](steps), cwd[name], env.get(name))

    for name in tools:  # warm-up: the checkpoint into the page cache
        run(name, 1)
    runs: dict[str, list] = {name: [] for name in tools}
    for _ in range(rounds):
        for name in tools:
            runs[name].append((run(name, few), run(name, many)))
    results = {}
    for name, pairs in runs.items():
        results[name] = {
            # after the first step began, so that start-up's spread (loading varies by seconds) stays out
            "step": statistics.median(((b[1] - b[0]) - (a[1] - a[0])) / (many - few) for a, b in pairs),
            "startup": statistics.median(run[0] for pair in pairs for run in pair),
            "rss": max(run[2] for pair in pairs for run in pair),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "sd-lite-bench")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--few", type=int, default=2, help="steps of the short run")
    parser.add_argument("--many", type=int, default=6, help="steps of the long run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians are printed)")
    parser.add_argument("--kohya_dir", type=Path, help="a kohya sd-scripts checkout to compare with")
    parser.add_argument("--kohya_python", type=str, help="the python of kohya's environment")
    parser.add_argument(
        "--extra_path",
        default=str(REPO / "bench" / "kohya_torchvision"),
        help="folders put on kohya's PYTHONPATH only (default: the torchvision stand-in; '' for none)",
    )
    parser.add_argument(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="also time this suite with the flag (kohya: SDXL only)",
    )
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizers, data = make_inputs(args.work_dir, args.size, images=4)

    def command(python: str, script: Path, out: str, *extra: str):
        def command_for(steps: int) -> list[str]:
            flags = common_flags(checkpoint, tokenizers, data, args.work_dir / out, args.size, steps)
            return [python, str(script), *flags, "--network_train_unet_only", *extra]

        return command_for

    tools = {"ours": command(sys.executable, REPO / "train_network.py", "out-ours")}
    cwd = {"ours": REPO}
    if args.cache_text_encoder_outputs:
        tools["ours, cached TE"] = command(
            sys.executable, REPO / "train_network.py", "out-te", "--cache_text_encoder_outputs"
        )
        cwd["ours, cached TE"] = REPO
    if args.kohya_dir:
        tools["kohya"] = command(args.kohya_python or sys.executable, args.kohya_dir / "train_network.py", "out-kohya")
        cwd["kohya"] = args.kohya_dir
    results = measure(tools, cwd, args.few, args.many, args.rounds, env={"kohya": child_env(args.extra_path)})
    print(f"{'':16} {'s/step':>8} {'start-up s':>10} {'peak RSS GiB':>12}")
    for name, r in results.items():
        ratio = ""
        if "kohya" in results and name != "kohya":
            k = results["kohya"]
            ratio = (
                f"  vs kohya: step x{r['step'] / k['step']:.2f}, start-up x{r['startup'] / k['startup']:.2f},"
                f" RSS x{r['rss'] / k['rss']:.2f}"
            )
        print(f"{name:16} {r['step']:8.2f} {r['startup']:10.1f} {r['rss']:12.2f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
