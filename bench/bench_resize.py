"""Resize benchmark on the article's oversized LoCon: SD1.5, dim 512 / alpha 32, conv 512 / 16, 1.16 GiB fp16.

Measured in one run, on the same file:

* ``resize_lora.py --dynamic_method sv_ratio --dynamic_param 8`` on the whole file, as a user runs
  it (a subprocess: start-up, load, SVDs, save; its peak RSS is its own);
* the ``--sweep`` preview of the article's ten sv_ratio values, against ten such resizes;
* kohya's dense method (``up @ down`` in float32, full ``torch.linalg.svd``, kohya's rank rule) on
  one module of each distinct shape, extrapolated to all 350 modules by shape counts, against the
  factored SVD on the same modules.

    python -m bench.bench_resize [--work_dir DIR] [--dense_threads 1]

The LoRA is random with a decaying spectrum (``library.synthetic_lora``): column i of ``up`` is
scaled by (i + 1) ** -0.8, which puts sv_ratio 8 at rank ~14, the article's 30.9 MB.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from library.models.sd_configs import CLIP_L_TEXT, SD15_UNET
from library.resize.report import format_size
from library.synthetic_lora import LoRATarget, kohya_lora_targets, random_lora
from networks import svd as svd_module
from networks.svd import factored_svd, lora_matrices, select_rank

REPO = Path(__file__).resolve().parents[1]
SV_RATIO = 8.0
ARTICLE_SWEEP = "128,96,64,32,16,8,5,4,3,2"
METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "512",
    "ss_network_alpha": "32",
    "ss_network_args": '{"conv_dim": "512", "conv_alpha": "16"}',
    "ss_training_comment": "dim 512 by mistake",
}


def sd15_targets() -> list[LoRATarget]:
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
    return kohya_lora_targets(unet, text_encoder, conv=True)


def write_input(path: Path, targets: list[LoRATarget]) -> dict[str, torch.Tensor]:
    state_dict = random_lora(targets, dim=512, alpha=32, conv_dim=512, conv_alpha=16, decay=0.8, seed=0)
    save_file(state_dict, path, metadata=METADATA)
    return state_dict


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_script(*args: str) -> tuple[float, float, int, str]:
    """(wall s, CPU s, peak RSS bytes, stdout) of ``python resize_lora.py *args`` in a fresh process."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], cwd=REPO, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"resize_lora.py failed: {done.stderr.strip().splitlines()[-1]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1].removeprefix("peak_rss_kib="))
    return wall, cpu, peak_kib * 1024, done.stdout


# Runs resize_lora.main and reports the child's own peak RSS on its last stderr line.
_CHILD = (
    "import resource, sys, resize_lora\n"
    "resize_lora.main(sys.argv[1:])\n"
    "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
)


def kohya_dense_resize(up: torch.Tensor, down: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's method (research/kohya.md §5): dense float32 product, full SVD, rank rule, truncation."""
    delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)
    u, s, vh = torch.linalg.svd(delta)  # full_matrices=True, as kohya calls it
    rank = select_rank(s, max_rank, len(s), "sv_ratio", SV_RATIO).kohya_rank
    return u[:, :rank] * s[:rank], vh[:rank]


def factored_resize(up: torch.Tensor, down: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    svd = factored_svd(up, down)
    up2d, down2d = lora_matrices(up, down)
    rank = select_rank(svd.S, max_rank, min(up2d.shape[0], down2d.shape[1]), "sv_ratio", SV_RATIO).rank
    return svd.truncate(rank)


class _PreviousSVD(svd_module.LoRASVD):
    def _long_side(self, rank: int) -> torch.Tensor:
        return self._long.T @ (self._r.T @ self._eigenvectors[:, :rank])


def previous_resize(up: torch.Tensor, down: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factored resize as it was before (kept as the baseline): the fp16 inputs scanned for NaN/inf,
    the long factor's Gram matrix as one full matrix product."""
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ValueError("NaN or infinite weights")
    up2d, down2d = lora_matrices(up, down)
    transposed = up2d.shape[0] > down2d.shape[1]
    short, long = (down2d.T, up2d.T) if transposed else (up2d, down2d)
    reflectors, tau, r = svd_module._householder(short.double())
    long = long.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(r @ (long @ long.T) @ r.T)
    spectrum = eigenvalues.flip(0).clamp_min(0).sqrt()
    svd = _PreviousSVD(spectrum, transposed, (reflectors, tau), r, long, eigenvectors.flip(1))
    rank = select_rank(spectrum, max_rank, min(up2d.shape[0], down2d.shape[1]), "sv_ratio", SV_RATIO).rank
    return svd.truncate(rank)


def compare_previous(state_dict: dict[str, torch.Tensor], targets: list[LoRATarget], repeats: int = 2) -> None:
    """Every module, one thread, the previous code and the current one alternately: CPU seconds, same ranks."""
    torch.set_num_threads(1)
    pairs = [(state_dict[f"{t.name}.lora_up.weight"], state_dict[f"{t.name}.lora_down.weight"]) for t in targets]
    cpu = {"previous": [], "current": []}
    results = {}
    for _ in range(repeats):
        for name, fn in (("previous", previous_resize), ("current", factored_resize)):
            start = time.process_time()
            results[name] = [fn(up, down, 512) for up, down in pairs]
            cpu[name].append(time.process_time() - start)
    ranks_equal = all(a[0].shape == b[0].shape for a, b in zip(results["previous"], results["current"]))
    worst = max(
        float((pa @ da - pc @ dc).norm() / (pa @ da).norm())
        for (pa, da), (pc, dc) in zip(results["previous"], results["current"])
    )
    print(f"\nfactored resize of all {len(pairs)} modules, 1 thread, CPU s per run ({repeats} runs each, alternated):")
    for name, runs in cpu.items():
        print(f"  {name:>8}: " + ", ".join(f"{c:.1f}" for c in runs))
    print(f"  ranks equal: {ranks_equal}; kept updates differ by at most {worst:.1e} relative")


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, result)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu, result


def compare_dense(
    state_dict: dict[str, torch.Tensor], targets: list[LoRATarget], threads: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Per distinct shape, dense vs factored on one module; totals (wall, cpu) extrapolated by shape counts."""
    by_shape = collections.defaultdict(list)
    for target in targets:
        by_shape[(target.out_features, target.in_features, target.kernel_size)].append(target)
    dense = {"wall": 0.0, "cpu": 0.0}
    factored = {"wall": 0.0, "cpu": 0.0}
    print(f"\nkohya's dense method ({threads} torch threads) vs the factored SVD (1 thread), one module per shape:")
    print(
        f"{'out x in*k*k':>14} {'modules':>7} {'dense s':>8} {'cpu s':>7} {'factored s':>10} {'ratio':>6} {'ranks':>6}"
    )
    for shape, group in sorted(by_shape.items(), key=lambda item: -item[0][0] * item[0][1] * item[0][2][0] ** 2):
        name = group[0].name
        up, down = state_dict[f"{name}.lora_up.weight"], state_dict[f"{name}.lora_down.weight"]
        torch.set_num_threads(threads)
        dense_wall, dense_cpu, (dense_up, _) = timed(kohya_dense_resize, up, down, 512)
        torch.set_num_threads(1)
        ours_wall, ours_cpu, (ours_up, _) = timed(factored_resize, up, down, 512)
        for totals, wall, cpu in ((dense, dense_wall, dense_cpu), (factored, ours_wall, ours_cpu)):
            totals["wall"] += wall * len(group)
            totals["cpu"] += cpu * len(group)
        ranks = f"{dense_up.shape[1]}/{ours_up.shape[1]}"
        size = f"{shape[0]} x {shape[1] * shape[2][0] * shape[2][1]}"
        print(
            f"{size:>14} {len(group):>7} {dense_wall:>8.2f} {dense_cpu:>7.2f} {ours_wall:>10.3f}"
            f" {dense_wall / ours_wall:>6.0f} {ranks:>6}"
        )
    torch.set_num_threads(threads)
    return dense, factored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work_dir", type=Path, default=None, help="keep the 1.16 GiB input and the output here (default: a temp dir)"
    )
    parser.add_argument(
        "--dense_threads",
        type=int,
        default=1,
        help="torch threads for kohya's method (1: its CPU time is its work, whatever else runs on the machine)",
    )
    parser.add_argument(
        "--previous_only",
        action="store_true",
        help="only compare the current factored resize with the previous code on every module (no kohya, no script)",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        targets = sd15_targets()
        source = work / "locon_dim512.safetensors"
        state_dict = write_input(source, targets)
        print(f"input: {len(targets)} modules, {format_size(source.stat().st_size)} fp16")
        if args.previous_only:
            compare_previous(state_dict, targets)
            return

        flags = [
            "--model",
            str(source),
            "--save_precision",
            "fp16",
            "--new_rank",
            "512",
            "--dynamic_method",
            "sv_ratio",
        ]
        output = str(work / "out.safetensors")
        wall, cpu, peak, out = run_script(*flags, "--dynamic_param", str(SV_RATIO), "--save_to", output)
        print(f"\nresize_lora.py sv_ratio {SV_RATIO:g}, whole file (start-up, load, SVDs, save):")
        print(f"  {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {format_size(peak)}")
        print("  " + out.strip().replace("\n", "\n  "))
        sweep_wall, sweep_cpu, _, sweep_out = run_script(*flags, "--sweep", ARTICLE_SWEEP)
        print(f"\n--sweep {ARTICLE_SWEEP}: {sweep_wall:.1f} s wall, {sweep_cpu:.1f} s CPU (one resize: {wall:.1f} s)")
        print("  " + sweep_out.strip().replace("\n", "\n  "))

        dense, factored = compare_dense(state_dict, targets, args.dense_threads)
        print(f"\nextrapolated to all {len(targets)} modules:")
        print(f"  kohya's dense method: {dense['wall']:.0f} s wall, {dense['cpu']:.0f} s CPU")
        print(f"  factored SVD alone:   {factored['wall']:.1f} s wall, {factored['cpu']:.1f} s CPU (1 thread)")
        ratio_wall, ratio_cpu = dense["wall"] / wall, dense["cpu"] / cpu
        print(f"kohya's dense SVDs / whole-file resize_lora.py: {ratio_wall:.0f}x wall, {ratio_cpu:.0f}x CPU")
        print(f"load average at end: {os.getloadavg()[0]:.2f}; bench peak RSS {format_size(_self_peak())}")


def _self_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
