"""A DreamBooth set on the toy world: a new concept bound to a rare token, with class images.

The concept is a colour/shape combination the base model never saw (a held-out one by default),
shown in a few instance images captioned ``a <token> <shape>``; the regularisation images are the
same shape in the other pretraining colours, with their true captions, so prior preservation is
what kohya's DreamBooth recipe teaches. Optionally a second regularisation folder holds pretraining
images of the *other* shapes (a wider prior set): the class images protect only the class, while
the text encoder the network trains is shared by every prompt (docs/quality.md). Folders follow
kohya's ``<repeats>_<class>`` naming, so ``--train_data_dir`` and ``--reg_data_dir`` take them as
they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from library.errors import ConfigError
from library.toy_world.generator import COLOURS, SHAPES, combination_split, sample_images

# Image indices apart from the pretraining and evaluation ranges (library.toy_world.pretrain).
CONCEPT_IMAGES_FROM = 30_000_000
REGULARISATION_IMAGES_FROM = 31_000_000
OTHER_REGULARISATION_IMAGES_FROM = 31_500_000
# The wider prior folder's name sorts after every shape's class folder: kohya's balancing takes reg
# images folder by folder and gives the extra repeats from the first, so the class images keep the
# larger share (calibrated that way, docs/quality.md).
OTHER_REGULARISATION_FOLDER = "1_wider prior"
# What a set was written with, beside its folders: a reused folder must be the set asked for.
RECIPE_FILE = "concept_set.json"


@dataclass(frozen=True)
class Concept:
    colour: str
    shape: str
    token: str = "sks"

    @property
    def prompt(self) -> str:
        return f"a {self.token} {self.shape}"

    def check(self, seed: int) -> None:
        """One line if the words are unknown or the base model already saw this combination."""
        if self.colour not in COLOURS:
            raise ConfigError(f"--concept colour '{self.colour}' is not a toy colour: {', '.join(COLOURS)}")
        if self.shape not in SHAPES:
            raise ConfigError(f"--concept shape '{self.shape}' is not a toy shape: {', '.join(SHAPES)}")
        if self.token in COLOURS or self.token in SHAPES:
            raise ConfigError(f"--concept token '{self.token}' is a toy word; use a rare one such as sks")
        pretraining, _ = combination_split(seed)
        if (self.colour, self.shape) in pretraining:
            raise ConfigError(
                f"--concept '{self.colour} {self.shape}' is a pretraining combination: the base model knows it; "
                "pick a held-out one (tools/make_toy_world.py writes them to split.json)"
            )

    def other_combinations(self, seed: int) -> list[tuple[str, str]]:
        """The pretraining combinations of the other shapes: what the class images do not cover."""
        pretraining, _ = combination_split(seed)
        return [(colour, shape) for colour, shape in pretraining if shape != self.shape]

    def class_colours(self, seed: int) -> list[str]:
        """The colours the base model knows this shape in: the prior that training must keep."""
        pretraining, _ = combination_split(seed)
        return [colour for colour, shape in pretraining if shape == self.shape]


def write_concept_set(
    out: str | os.PathLike,
    concept: Concept,
    images: int,
    repeats: int,
    reg_per_colour: int,
    seed: int,
    other_reg_per_combination: int = 0,
    reuse: bool = False,
) -> tuple[Path, Path]:
    """``out/img/<repeats>_<token> <shape>`` (instance images) and ``out/reg/1_<shape>`` (class images).

    ``other_reg_per_combination`` > 0 adds ``out/reg/1_wider prior``: that many captioned images of
    each other-shape pretraining combination, trained with the class images under the same prior
    loss weight (kohya's ``--reg_data_dir`` takes every sub-folder). The arguments are written
    beside the folders (``concept_set.json``). ``reuse`` keeps an ``out`` that already holds this
    very set (benches reuse a work folder) and refuses, in one line, one written with other
    arguments or without that file (an interrupted write): training on it would measure another set
    than the flags say.
    """
    concept.check(seed)
    instance = Path(out) / "img" / f"{repeats}_{concept.token} {concept.shape}"
    regularisation = Path(out) / "reg" / f"1_{concept.shape}"
    recipe = {
        "concept": asdict(concept),
        "images": images,
        "repeats": repeats,
        "reg_per_colour": reg_per_colour,
        "seed": seed,
        "other_reg_per_combination": other_reg_per_combination,
    }
    if reuse and Path(out).exists():
        _check_reused(Path(out), recipe)
        return instance, regularisation
    for folder in (instance, regularisation):
        folder.mkdir(parents=True, exist_ok=True)
    for index, (_, image) in enumerate(
        sample_images([(concept.colour, concept.shape)], images, seed, CONCEPT_IMAGES_FROM)
    ):
        image.save(instance / f"{index:03d}.png")
        (instance / f"{index:03d}.txt").write_text(concept.prompt + "\n")
    classes = [(colour, concept.shape) for colour in concept.class_colours(seed)]
    for index, (spec, image) in enumerate(
        sample_images(classes, reg_per_colour * len(classes), seed, REGULARISATION_IMAGES_FROM)
    ):
        stem = f"{index:03d}_{spec.colour}"
        image.save(regularisation / f"{stem}.png")
        (regularisation / f"{stem}.txt").write_text(spec.caption + "\n")
    if other_reg_per_combination > 0:
        wider = Path(out) / "reg" / OTHER_REGULARISATION_FOLDER
        wider.mkdir(parents=True, exist_ok=True)
        others = concept.other_combinations(seed)
        drawn = sample_images(others, other_reg_per_combination * len(others), seed, OTHER_REGULARISATION_IMAGES_FROM)
        for index, (spec, image) in enumerate(drawn):
            stem = f"{index:03d}_{spec.colour}_{spec.shape}"
            image.save(wider / f"{stem}.png")
            (wider / f"{stem}.txt").write_text(spec.caption + "\n")
    (Path(out) / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return instance, regularisation


def _check_reused(out: Path, recipe: dict) -> None:
    written = out / RECIPE_FILE
    if not written.exists():
        raise ConfigError(
            f"{out} holds no {RECIPE_FILE} (an interrupted or older set): remove it or use another --work_dir"
        )
    found = json.loads(written.read_text())
    changed = ", ".join(
        f"{key} {found.get(key)} -> {value}" for key, value in recipe.items() if found.get(key) != value
    )
    if changed:
        raise ConfigError(
            f"{out} holds a concept set written with other arguments ({changed}): use another --work_dir"
        )
