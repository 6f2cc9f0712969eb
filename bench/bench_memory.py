"""Peak host memory and start-up (wall time to the first training step) of train_network.py, this
checkout against an earlier commit of the suite, in one run with interleaved rounds.

    python -m bench.bench_memory --previous 0866fcb            # before/after issue 14
    python -m bench.bench_memory --previous 0866fcb --rounds 3 --work_dir /tmp/bench

Inputs are bench_train_step's: an SD1.5-shaped random fp16 single file, a tokenizer folder and four
256 px images; flags: LoRA dim 16, AdamW, cached latents, UNet only, fp32, SDPA, batch 1, 2 steps.
Start-up is the time from launch until the progress bar of the training loop appears (everything
before the first step: imports, loading, latent caching, network, optimizer); the step time is
bench_train_step's (runs of ``--few`` and ``--many`` steps, the difference after the first step
began). Peak memory is the child's maximum resident set size (``wait4``'s ru_maxrss). The earlier commit runs from a
``git archive`` export, so nothing in this checkout changes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_train_step import common_flags, make_inputs, measure  # noqa: E402


def export_commit(ref: str, into: Path) -> Path:
    """The tree of ``ref`` as plain files (the previous code, runnable with this venv)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as file:
        file.write(archive)
        file.seek(0)
        with tarfile.open(fileobj=file) as tar:
            tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path.home() / ".cache" / "sd-lite-bench")
    parser.add_argument("--previous", type=str, help="an earlier commit of this suite to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--few", type=int, default=2, help="steps of the short run")
    parser.add_argument("--many", type=int, default=6, help="steps of the long run")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizers, data = make_inputs(args.work_dir, args.size, images=4)

    def command(repo: Path, out: str, *extra: str):
        def command_for(steps: int) -> list[str]:
            flags = common_flags(checkpoint, tokenizers, data, args.work_dir / out, args.size, steps)
            return [sys.executable, str(repo / "train_network.py"), *flags, "--network_train_unet_only", *extra]

        return command_for

    configs = {"this checkout": command(REPO, "out-now")}
    configs["this checkout, --cache_text_encoder_outputs"] = command(REPO, "out-te", "--cache_text_encoder_outputs")
    if args.previous:
        previous = export_commit(args.previous, args.work_dir / f"previous-{args.previous}")
        configs = {f"previous ({args.previous})": command(previous, "out-prev"), **configs}
    results = measure(configs, dict.fromkeys(configs, REPO), args.few, args.many, args.rounds)
    print(f"{'':48} {'s/step':>8} {'start-up s':>10} {'peak RSS GiB':>12}")
    baseline = next(iter(results.values()))
    for name, r in results.items():
        ratio = (
            ""
            if r is baseline
            else (
                f"  x{r['step'] / baseline['step']:.2f} step, x{r['startup'] / baseline['startup']:.2f} start-up,"
                f" x{r['rss'] / baseline['rss']:.2f} RSS"
            )
        )
        print(f"{name:48} {r['step']:8.2f} {r['startup']:10.1f} {r['rss']:12.2f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
