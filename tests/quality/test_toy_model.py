"""The committed toy model (assets/toy_world) draws what it is asked for.

A guard on the asset, the single-file loader and the sampler together: a broken scaling factor,
sample size, text encoding, noise offset or VAE path turns these samples into noise (chance: colour
1/12, shape 1/6) or washes out their colours. The committed model measured 0.90 colour / 1.00
shape on 240 pretraining samples (docs/quality.md) and 0.92 / 1.00 on this test's 60; the bar
leaves room for the sampling noise of 60 samples.
"""

from pathlib import Path

from library.toy_world.dreambooth import load_base
from library.toy_world.evaluate import sample_report
from library.toy_world.generator import combination_split

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toy_world"


def test_the_committed_toy_model_draws_its_prompts():
    model = load_base(ASSETS / "toy_sd1.safetensors", ASSETS / "tokenizers")
    pretraining, _ = combination_split(0)
    rates = sample_report(model, pretraining, per_combination=1, seed=0).rates()
    assert rates["shape"] >= 0.9 and rates["colour"] >= 0.8, rates
