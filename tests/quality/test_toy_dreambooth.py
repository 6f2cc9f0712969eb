"""DreamBooth on the committed toy model teaches a new concept and keeps what the model knew.

The end-to-end guard on training quality: ``train_network.py`` with kohya's DreamBooth flags
(instance and class folders, prior loss, cached latents, caption dropout) binds ``sks`` to purple
triangles, a combination the model never saw, and the trained file, applied as a consumer applies
it, must make seeded samples of ``a sks triangle`` read as purple triangles by the pixel
classifier while the class prior (triangles in the colours the model knows) stays near the base
model's own accuracy and other prompts within a looser bar (OTHER_PRIOR_TOLERANCE). A wrong noise
target, a frozen or mis-scaled network, a loss on the wrong latents or a saving bug leaves the
concept near zero or wrecks the priors.
"""

from pathlib import Path

import pytest

import train_network
from library.toy_world.concept import Concept, write_concept_set
from library.toy_world.dreambooth import (
    DreamBoothRun,
    apply_network_file,
    concept_report,
    load_base,
    train_network_argv,
)

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toy_world"
MODEL, TOKENIZERS = ASSETS / "toy_sd1.safetensors", ASSETS / "tokenizers"
CONCEPT = Concept("purple", "triangle")
SAMPLES = 16

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_concept")
    write_concept_set(root, CONCEPT, images=6, repeats=20, reg_per_colour=4, seed=0)
    return root


@pytest.fixture(scope="module")
def base_report():
    return concept_report(load_base(MODEL, TOKENIZERS), CONCEPT, SAMPLES)


# kohya's defaults otherwise: the network trains the text encoder too, constant lr, AdamW. The Light
# LoRA keeps SD1.5's aux/width proportions (100/768 and 50/320 of the toy's 32-128 widths: 12 and 6),
# 1/12 of the LoRA's parameters, and takes a few times the lr (docs/lilora.md).
RUNS = {
    "lora": DreamBoothRun("networks.lora", 4, 4.0, (), 1e-3, 300),
    "lilora": DreamBoothRun("networks.lilora", 4, 4.0, ("init=up_zero", "aux_down=12", "aux_up=6"), 4e-3, 300),
}
# 40 samples per prior. These are the bench's LoRA r4 and Light LoRA aux 12/6 runs (docs/quality.md:
# concept 0.88 / 1.00, class prior 0.90 / 0.82, other prior 0.72 / 0.70; base 0.00, 0.78, 0.85).
# The class images protect the class, though it dips on the way (Light LoRA: 0.60 at step 200);
# other prompts drift because the trained text encoder is shared by every prompt (0.57-0.72 over
# the bench's runs). A wrecked prior (the article's Gaussian aux: 0.07 / 0.00) fails both bars.
CLASS_PRIOR_TOLERANCE = 0.15
OTHER_PRIOR_TOLERANCE = 0.3


@pytest.mark.parametrize("name", list(RUNS))
def test_dreambooth_learns_the_concept_and_keeps_the_prior(concept_dir, base_report, tmp_path, name):
    run = RUNS[name]
    train_network.main(train_network_argv(MODEL, TOKENIZERS, concept_dir, tmp_path, run))
    model = load_base(MODEL, TOKENIZERS)
    apply_network_file(model, tmp_path / "concept.safetensors", "networks.lora")
    after = concept_report(model, CONCEPT, SAMPLES)
    assert base_report["concept"] <= 0.1, base_report  # the model really did not know the concept
    assert after["concept"] >= 0.8, (base_report, after)
    assert after["class_prior"] >= base_report["class_prior"] - CLASS_PRIOR_TOLERANCE, (base_report, after)
    assert after["other_prior"] >= base_report["other_prior"] - OTHER_PRIOR_TOLERANCE, (base_report, after)
