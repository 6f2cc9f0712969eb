"""Accuracy of the toy world's pixel classifier on the generator's images, clean and degraded.

    python -m bench.bench_toy_classifier                 # 2016 images (28 per combination), seed 7
    python -m bench.bench_toy_classifier --images 720 --seed 3

Degradations stand in for what a small diffusion model's samples get wrong: Gaussian blur (soft
edges), pixel noise, a 2x down-and-up resampling (lost detail), hue drift and washed-out colour.
Prints one row per condition with colour and shape accuracy and the most frequent confusions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image
from scipy import ndimage

from library.toy_world.evaluate import Accuracy
from library.toy_world.generator import COLOURS, SHAPES, sample_images


def _blur_noise(sigma: float, noise: float):
    def apply(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if sigma:
            pixels = ndimage.gaussian_filter(pixels, (sigma, sigma, 0))
        return np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 1) if noise else pixels

    return apply


def _resample(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    return np.asarray(image.resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR), np.float32) / 255


def _colour_drift(hue_degrees: float, saturation: float):
    def apply(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        hsv = np.asarray(Image.fromarray(np.round(pixels * 255).astype(np.uint8)).convert("HSV"), np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.choice([-1, 1]) * hue_degrees * 256 / 360) % 256
        hsv[..., 1] *= saturation
        rgb = Image.fromarray(np.round(hsv).astype(np.uint8), mode="HSV").convert("RGB")
        return np.asarray(rgb, np.float32) / 255

    return apply


CONDITIONS = {
    "clean": _blur_noise(0, 0),
    "blur 1": _blur_noise(1.0, 0),
    "blur 1 + noise 0.05": _blur_noise(1.0, 0.05),
    "blur 1.5 + noise 0.05": _blur_noise(1.5, 0.05),
    "blur 2 + noise 0.08": _blur_noise(2.0, 0.08),
    "2x down/up resample": _resample,
    "hue +-10 deg, saturation x0.6": _colour_drift(10, 0.6),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2016)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    drawn = sample_images([(c, s) for c in COLOURS for s in SHAPES], args.images, args.seed)
    print(f"| condition ({args.images} images) | colour | shape | s | most frequent confusions |")
    print("|---|---|---|---|---|")
    for name, degrade in CONDITIONS.items():
        rng, accuracy, start = np.random.default_rng(0), Accuracy(), time.perf_counter()
        for spec, image in drawn:
            accuracy.add(spec.colour, spec.shape, degrade(np.asarray(image, np.float32) / 255, rng))
        rates = accuracy.rates()
        worst = sorted(accuracy.confusion.items(), key=lambda kv: -kv[1])[:4]
        confusions = ", ".join(f"{a}->{b} {n}" for (a, b), n in worst) or "none"
        elapsed = time.perf_counter() - start
        print(f"| {name} | {rates['colour']:.4f} | {rates['shape']:.4f} | {elapsed:.1f} | {confusions} |")


if __name__ == "__main__":
    main()
