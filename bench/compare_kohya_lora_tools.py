"""Our merge_lora.py / svd_merge_lora.py against kohya's own scripts on SD1.5-shaped random LoRAs, same run.

Needs a kohya sd-scripts checkout (``--kohya_dir``; its ``library`` must import: run it with an
environment that has kohya's requirements, or give ``--extra_path`` folders with import stubs for
the image packages the LoRA tools never call). Writes everything under ``--work_dir``.

    python -m bench.compare_kohya_lora_tools --kohya_dir ~/sd-scripts [--extra_path DIR] [--conv]

Checks: ``merge_lora.py --kohya_arithmetic`` (and ``--concat``) write kohya's tensors bit for bit;
``svd_merge_lora.py`` gives kohya's ranks and an update closer to the exact sum than kohya's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.bench_resize import sd15_targets
from library.synthetic_lora import random_lora

REPO = Path(__file__).resolve().parents[1]


def run(cwd: Path, script: str, args: list[str], pythonpath: str) -> float:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed: {done.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start


def update(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down = tensors[f"{name}.lora_down.weight"].double()
    up = tensors[f"{name}.lora_up.weight"].double()
    return (
        (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        * float(tensors[f"{name}.alpha"])
        / down.shape[0]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kohya_dir", required=True, type=Path)
    parser.add_argument("--extra_path", default="", help="folders prepended to kohya's PYTHONPATH (import stubs)")
    parser.add_argument("--work_dir", type=Path, default=None)
    parser.add_argument("--conv", action="store_true", help="LoCon inputs (kohya's dense SVDs then take minutes)")
    parser.add_argument("--skip_merge", action="store_true", help="only the svd_merge_lora.py comparison")
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kohya_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    kohya_path = os.pathsep.join(p for p in (str(args.kohya_dir), args.extra_path) if p)
    targets = [t for t in sd15_targets() if args.conv or not t.is_conv or t.kernel_size == (1, 1)]
    if not args.conv:
        targets = [t for t in targets if "resnets" not in t.path and "samplers" not in t.path]
    files = []
    for index, (dim, alpha) in enumerate([(16, 8.0), (16, 4.0), (8, 8.0)]):
        path = work / f"lora{index}.safetensors"
        save_file(random_lora(targets, dim, alpha, dim // 2, alpha / 2, seed=index, dtype=torch.float16), path)
        files.append(str(path))
    print(f"{len(targets)} SD1.5 modules per LoRA; files in {work}")
    names = sorted({t.name for t in targets})

    merges = [] if args.skip_merge else [("sum", [], files[:2]), ("concat", ["--concat"], [files[0], files[2]])]
    for label, extra, inputs in merges:
        kohya_out, ours_out = work / f"kohya_{label}.safetensors", work / f"ours_{label}.safetensors"
        common = ["--models", *inputs, "--ratios", "0.7", "-0.4", *extra]
        kohya_s = run(args.kohya_dir, "networks/merge_lora.py", [*common, "--save_to", str(kohya_out)], kohya_path)
        ours_s = run(REPO, "networks/merge_lora.py", [*common, "--kohya_arithmetic", "--save_to", str(ours_out)], "")
        kohya, ours = load_file(kohya_out), load_file(ours_out)
        same = set(kohya) == set(ours) and all(torch.equal(kohya[k].float(), ours[k].float()) for k in kohya)
        dtypes = {str(v.dtype) for v in kohya.values()} | {str(v.dtype) for v in ours.values()}
        print(f"merge_lora {label}: kohya {kohya_s:.1f} s, ours {ours_s:.1f} s; tensors equal: {same} ({dtypes})")

    kohya_out, ours_out = work / "kohya_svd.safetensors", work / "ours_svd.safetensors"
    common = ["--models", *files[:2], "--ratios", "0.7", "-0.4", "--new_rank", "8", "--new_conv_rank", "4"]
    kohya_s = run(args.kohya_dir, "networks/svd_merge_lora.py", [*common, "--save_to", str(kohya_out)], kohya_path)
    ours_s = run(REPO, "networks/svd_merge_lora.py", [*common, "--save_to", str(ours_out)], "")
    kohya, ours = load_file(kohya_out), load_file(ours_out)
    inputs = [load_file(f) for f in files[:2]]
    same_ranks = all(kohya[f"{n}.lora_down.weight"].shape == ours[f"{n}.lora_down.weight"].shape for n in names)
    closer, ratios = 0, []
    for name in names:
        exact = 0.7 * update(inputs[0], name) - 0.4 * update(inputs[1], name)
        ours_error = torch.linalg.matrix_norm(update(ours, name) - exact)
        kohya_error = torch.linalg.matrix_norm(update(kohya, name) - exact)
        closer += int(ours_error <= kohya_error)
        ratios.append(float(ours_error / kohya_error))
    print(
        f"svd_merge_lora: kohya {kohya_s:.1f} s, ours {ours_s:.1f} s; same ranks: {same_ranks}; "
        f"ours closer to the exact sum in {closer}/{len(names)} modules "
        f"(error ratio ours/kohya {min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
