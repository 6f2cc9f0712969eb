"""Quality on the pretrained toy world: what each method does to what the model draws (docs/quality.md).

    python -m bench.bench_quality --model assets/toy_world/toy_sd1.safetensors \\
        --tokenizers assets/toy_world/tokenizers --rows base dreambooth

Every row comes from seeded samples of the toy model read by the pixel classifier. ``base``: the
model's colour/shape accuracy on pretraining and held-out prompts. ``dreambooth``: a new concept
(a held-out colour/shape bound to ``--token``) trained by ``train_network.py`` with each network
family, scored before and after: concept accuracy (samples of ``a <token> <shape>`` read as the
concept), class prior (the shape in its known colours) and other prior (other pretraining prompts),
beside the base model's own prior, trainable parameters and file size. The concept, the number of
instance images, steps and seeds are flags. ``distill``: BK-SDM students of the toy model trained by
``distill_unet.py`` with and without KD, scored against the teacher (bench/quality_distill.py).
``ffn``: narrow FFNs by ``tools/compress_ffn.py``, ``pca`` against ``prune`` init, after each stage
(bench/quality_ffn.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import train_network  # noqa: E402
from bench.quality_distill import add_distill_args, distill_rows  # noqa: E402
from bench.quality_ffn import add_ffn_args, ffn_rows  # noqa: E402
from library.toy_world.concept import Concept, write_concept_set  # noqa: E402
from library.toy_world.dreambooth import (  # noqa: E402
    DreamBoothRun,
    apply_network_file,
    concept_report,
    load_base,
    train_network_argv,
)
from library.toy_world.evaluate import sample_report  # noqa: E402
from library.toy_world.generator import combination_split  # noqa: E402

# (row name, network module, network_args, dim, alpha, learning rate)
METHODS = {
    "lora r4": ("networks.lora", (), 4, 4.0, 1e-3),
    "locon r4": ("networks.lora", ("conv_dim=4", "conv_alpha=4"), 4, 4.0, 1e-3),
    "lora r1": ("networks.lora", (), 1, 1.0, 1e-3),
    "lilora r4 up_zero": ("networks.lilora", ("init=up_zero",), 4, 4.0, 1e-3),
    "lilora r4 down_zero": ("networks.lilora", ("init=down_zero",), 4, 4.0, 1e-3),
    "lilora r4 joint": ("networks.lilora", ("init=joint",), 4, 4.0, 1e-3),
    "lilora r1 up_zero": ("networks.lilora", ("init=up_zero",), 1, 1.0, 1e-3),
}


def trainable_parameters(path: Path, module_name: str, model) -> int:
    network, _ = importlib.import_module(module_name).create_network_from_weights(
        1.0, path, model.vae, model.text_encoder, model.unet
    )
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def base_rows(model, seed: int, samples: int) -> list[str]:
    pretraining, held_out = combination_split(seed)
    rows = []
    for name, combinations in (("pretraining", pretraining), ("held-out", held_out)):
        rates = sample_report(model, combinations, samples, seed).rates()
        rows.append(f"| base, {name} prompts | {rates['colour']:.2f} | {rates['shape']:.2f} | {rates['both']:.2f} |")
    return rows


def dreambooth_rows(args: argparse.Namespace, work: Path, methods: list[str]) -> list[str]:
    concept = Concept(*args.concept.split(), args.token)
    concept_dir = work / "concept"
    write_concept_set(concept_dir, concept, args.images, args.repeats, args.reg_per_colour, args.seed)
    base = load_base(args.model, args.tokenizers)
    before = concept_report(base, concept, args.samples, args.seed)
    rows = [
        f"| base model | - | - | {before['concept']:.2f} | {before['concept_colour']:.2f} | "
        f"{before['class_prior']:.2f} | {before['other_prior']:.2f} | - |"
    ]
    print(rows[0], flush=True)
    for name in methods:
        module, network_args, dim, alpha, lr = METHODS[name]
        run = DreamBoothRun(module, dim, alpha, network_args, lr, args.steps, args.batch, args.seed)
        out = work / name.replace(" ", "_")
        started = time.perf_counter()
        train_network.main(train_network_argv(args.model, args.tokenizers, concept_dir, out, run))
        seconds = time.perf_counter() - started
        model = load_base(args.model, args.tokenizers)
        path = out / "concept.safetensors"
        parameters = trainable_parameters(path, module, model)
        apply_network_file(model, path, module)
        after = concept_report(model, concept, args.samples, args.seed)
        size_kb = path.stat().st_size / 1000
        rows.append(
            f"| {name} | {parameters:,} | {size_kb:.0f} KB | {after['concept']:.2f} | {after['concept_colour']:.2f} | "
            f"{after['class_prior']:.2f} | {after['other_prior']:.2f} | {seconds:.0f} s |"
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the toy model's single file")
    parser.add_argument("--tokenizers", required=True, help="its --tokenizer_cache_dir")
    parser.add_argument(
        "--rows", nargs="+", default=["base", "dreambooth"], choices=["base", "dreambooth", "distill", "ffn"]
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--concept", default="purple triangle", help="a held-out colour and shape")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--images", type=int, default=6, help="instance images")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reg_per_colour", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200, help="training steps per DreamBooth run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16, help="seeded samples per scored prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    add_distill_args(parser)
    add_ffn_args(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if "base" in args.rows:
            print("| row | colour | shape | both |\n|---|---|---|---|")
            model = load_base(args.model, args.tokenizers)
            for row in base_rows(model, args.seed, max(1, args.samples // 4)):
                print(row, flush=True)
        if "dreambooth" in args.rows:
            print(f"\nDreamBooth '{args.concept}' as '{args.token}', {args.images} images, {args.steps} steps")
            print("| method | trainable | file | concept | concept colour | class prior | other prior | train |")
            print("|---|---|---|---|---|---|---|---|")
            dreambooth_rows(args, Path(tmp), args.methods)
        if "distill" in args.rows:
            distill_rows(args, Path(tmp))  # prints its title, header and rows
        if "ffn" in args.rows:
            ffn_rows(args, Path(tmp))


if __name__ == "__main__":
    main()
