"""Quality on the pretrained toy world: what each method does to what the model draws (docs/quality.md).

    python -m bench.bench_quality --model assets/toy_world/toy_sd1.safetensors \\
        --tokenizers assets/toy_world/tokenizers            # every row; about 27 min on 2 cores

Every row comes from seeded samples of the toy model read by the pixel classifier. ``base``: the
model's colour/shape accuracy on pretraining and held-out prompts. ``dreambooth``: a new concept
(a held-out colour/shape bound to ``--token``) trained by ``train_network.py`` with each network
family (LoRA, LoCon, Light LoRA variants, full UNet fine-tuning as the ceiling), scored before and
after: concept accuracy (samples of ``a <token> <shape>`` read as the concept, also at every
checkpoint), class prior (the shape in its known colours) and other prior (other pretraining
prompts), beside the base model's own prior, trainable parameters and file size. ``resize``: the
LoRA r4/r16 files through ``resize_lora.py`` at each sv_ratio and fixed rank
(bench/quality_dreambooth.py). The concept, the number of instance images, steps and seeds are
flags. ``distill``: BK-SDM students of the toy model trained by
``distill_unet.py`` with and without KD, scored against the teacher (bench/quality_distill.py).
``ffn``: narrow FFNs by ``tools/compress_ffn.py``, ``pca`` against ``prune`` init, after each stage
(bench/quality_ffn.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.quality_distill import add_distill_args, distill_rows  # noqa: E402
from bench.quality_dreambooth import add_dreambooth_args, dreambooth_rows, resize_rows  # noqa: E402
from bench.quality_ffn import add_ffn_args, ffn_rows  # noqa: E402
from library.toy_world.dreambooth import load_base  # noqa: E402
from library.toy_world.evaluate import SAMPLE_GUIDANCE, sample_report  # noqa: E402
from library.toy_world.generator import combination_split  # noqa: E402


def base_rows(model, seed: int, samples: int, guidances: list[float]) -> list[str]:
    pretraining, held_out = combination_split(seed)
    rows = []
    for guidance in guidances:
        for name, combinations in (("pretraining", pretraining), ("held-out", held_out)):
            rates = sample_report(model, combinations, samples, seed, guidance=guidance).rates()
            rows.append(
                f"| base, {name} prompts, guidance {guidance:g} | {rates['colour']:.2f} | {rates['shape']:.2f} "
                f"| {rates['both']:.2f} |"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the toy model's single file")
    parser.add_argument("--tokenizers", required=True, help="its --tokenizer_cache_dir")
    rows = ["base", "dreambooth", "resize", "distill", "ffn"]
    parser.add_argument("--rows", nargs="+", default=rows, choices=rows)
    parser.add_argument("--concept", default="purple triangle", help="a held-out colour and shape")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--images", type=int, default=6, help="instance images")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reg_per_colour", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="training steps per DreamBooth run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16, help="seeded samples per scored prompt")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="the world's seed (held-out split, concept and prior images, sample noise): the model's pretraining "
        "seed, 0 for the committed model; another split scores prompts the model never learnt",
    )  # fmt: skip
    parser.add_argument("--train_seed", type=int, default=0, help="kohya's --seed of every training run")
    parser.add_argument(
        "--guidance", type=float, nargs="+", default=[SAMPLE_GUIDANCE], help="CFG scales of the base rows"
    )
    parser.add_argument("--threads", type=int, default=1)
    add_dreambooth_args(parser)
    add_distill_args(parser)
    add_ffn_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        if "base" in args.rows:
            print("| row | colour | shape | both |\n|---|---|---|---|")
            model = load_base(args.model, args.tokenizers)
            for row in base_rows(model, args.seed, max(1, args.samples // 4), args.guidance):
                print(row, flush=True)
        trained = {}
        if "dreambooth" in args.rows:
            trained = dreambooth_rows(args, work, args.methods)  # prints its title, header and rows
        if "resize" in args.rows:
            resize_rows(args, work, trained)  # trains lora r4 / r16 itself if dreambooth did not
        if "distill" in args.rows:
            distill_rows(args, Path(tmp))  # prints its title, header and rows
        if "ffn" in args.rows:
            ffn_rows(args, Path(tmp))


if __name__ == "__main__":
    main()
