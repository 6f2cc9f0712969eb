"""Block-removal students against their teacher: parameters, MACs and CPU forward latency, as ratios.

    python -m bench.bench_distill                       # SD1.5-sized teacher, 256 and 512 px
    python -m bench.bench_distill --teacher sd21 --runs 3
    python -m bench.bench_distill --teacher sdxl --sequential   # SDXL, SSD-1B and Vega, one at a time

The teacher has random weights (latency does not depend on them); each student is built from it
with ``build_student``, and all stay in memory (about 9 GB for SD1.5 and three students). MACs are
counted on the meta device, attention matmuls included. Latency: batch 1, 77 text tokens, fp32,
``torch.inference_mode``; one warm-up forward per model, then the median of ``--runs`` timed
forwards, taken round-robin over the models so that load from other processes hits all alike.
``--sequential`` instead builds and times one model at a time (randomly initialised students) and
frees it: SDXL and its two students together would take about 19 GB.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from library.distill.cost import CONTEXT_TOKENS, count_macs, count_parameters, extra_conditioning
from library.distill.sdxl_students import SDXL_STUDENTS
from library.distill.students import BK_STUDENTS, STUDENTS, build_student, student_config
from library.models.sd_configs import SD15_UNET, SD21_UNET, SDXL_UNET

TEACHERS = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="sd15")
    parser.add_argument("--students", nargs="+", choices=STUDENTS, help="default: the teacher family's presets")
    parser.add_argument("--resolutions", nargs="+", type=int, default=[256, 512], help="image sizes in pixels")
    parser.add_argument("--runs", type=int, default=2, help="timed forwards per model and size (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sequential", action="store_true", help="one model in memory at a time")
    args = parser.parse_args(argv)
    if args.students is None:
        args.students = list(SDXL_STUDENTS if args.teacher == "sdxl" else BK_STUDENTS)
    return args


def timed_forward(unet: UNet2DConditionModel, pixels: int) -> float:
    """Seconds of one batch-1 forward at ``pixels`` x ``pixels``."""
    latent = pixels // 8
    context_dim = unet.config.cross_attention_dim
    sample = torch.randn(1, unet.config.in_channels, latent, latent)
    context = torch.randn(1, CONTEXT_TOKENS, context_dim if isinstance(context_dim, int) else context_dim[0])
    extra = extra_conditioning(unet, 1, "cpu")
    with torch.inference_mode():
        start = time.perf_counter()
        unet(sample, torch.tensor([500]), context, **extra)
        return time.perf_counter() - start


def measure(models: dict[str, UNet2DConditionModel], args: argparse.Namespace) -> list[dict]:
    """Sizes, MACs and median latencies; timed runs go round-robin so that load from other
    processes on a shared machine falls on every model alike."""
    rows = {name: {"model": name, "params": count_parameters(unet)} for name, unet in models.items()}
    progress = tqdm(total=len(models) * len(args.resolutions) * (args.runs + 1), desc="forwards", unit="fwd")
    for pixels in args.resolutions:
        times = {name: [] for name in models}
        for run in range(args.runs + 1):
            for name, unet in models.items():
                seconds = timed_forward(unet, pixels)
                if run:  # run 0 is the warm-up
                    times[name].append(seconds)
                progress.update()
        for name, unet in models.items():
            rows[name][f"gmacs_{pixels}"] = count_macs(unet.config, pixels // 8) / 1e9
            rows[name][f"seconds_{pixels}"] = statistics.median(times[name])
    progress.close()
    return list(rows.values())


def print_table(rows: list[dict], resolutions: list[int]) -> None:
    teacher = rows[0]
    header = f"{'model':<10} {'params':>13} {'ratio':>6}"
    for pixels in resolutions:
        header += f" {f'GMACs@{pixels}':>11} {'ratio':>6} {f's/fwd@{pixels}':>10} {'ratio':>6}"
    print(header)
    for row in rows:
        line = f"{row['model']:<10} {row['params']:>13,} {row['params'] / teacher['params']:>6.3f}"
        for pixels in resolutions:
            macs, seconds = row[f"gmacs_{pixels}"], row[f"seconds_{pixels}"]
            line += f" {macs:>11.1f} {macs / teacher[f'gmacs_{pixels}']:>6.3f}"
            line += f" {seconds:>10.3f} {seconds / teacher[f'seconds_{pixels}']:>6.3f}"
        print(line)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, fp32, batch 1, {args.runs} timed runs")
    torch.manual_seed(0)
    if args.sequential:
        with torch.device("meta"):
            config = UNet2DConditionModel(**TEACHERS[args.teacher]).config
        configs = {args.teacher: dict(config)} | {name: student_config(config, name) for name in args.students}
        rows = []
        for name, model_config in configs.items():  # latency does not depend on the weights
            rows += measure({name: UNet2DConditionModel.from_config(model_config).eval()}, args)
        print_table(rows, args.resolutions)
        return
    teacher = UNet2DConditionModel(**TEACHERS[args.teacher]).eval()
    models = {args.teacher: teacher}
    for name in args.students:
        models[name] = build_student(teacher, student_config(teacher.config, name))[0].eval()
    print_table(measure(models, args), args.resolutions)


if __name__ == "__main__":
    main()
