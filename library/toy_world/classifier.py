"""Read a toy image back into (colour, shape), deterministically, from its pixels alone.

Hand-written rather than learned on purpose: a learned classifier would share the blind spots of
the models it judges and would need its own training run; this one follows from how the
generator draws (one shape, a near-grey background, saturated or clearly brighter/darker
foreground) and from scale-free geometry, so it also reads blurry or noisy samples of a
diffusion model.

Steps: the background colour is the median of the image border; pixels farther from it than half
the foreground contrast form the foreground (its largest connected part); the colour is the
median of the foreground's core pixels, named by hue (or by brightness when it is grey); the shape
comes from four scale- and rotation-free numbers of the foreground mask -- the fraction of it that
is a hole (ring) and the strength of its 3-, 4- and 5-fold angular harmonics about the centroid
(triangle; square, and more strongly cross; star; a circle has none) -- matched to the nearest
of the same numbers measured on each shape drawn large.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from library.toy_world.generator import GREYS, HUES, SHAPES, shape_mask

UNKNOWN = "unknown"
BORDER = 2  # pixels of the frame that estimate the background
MIN_CONTRAST = 0.1  # RGB distance in [0, 1] units below which the image holds no foreground
MIN_SATURATION = 0.3  # foreground saturation below which the colour is read as a grey
MIN_PIXELS = 12


@dataclass(frozen=True)
class ShapeFeatures:
    """Scale- and rotation-free numbers of a foreground mask; see the module docstring."""

    hole_fraction: float
    harmonic3: float
    harmonic4: float
    harmonic5: float

    def vector(self) -> np.ndarray:
        return np.array([self.hole_fraction, self.harmonic3, self.harmonic4, self.harmonic5])


@dataclass(frozen=True)
class Reading:
    colour: str
    shape: str
    features: ShapeFeatures | None = None


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = np.asarray(image, dtype=np.float32)
    return array / 255.0 if array.max() > 1.5 else array


def foreground_mask(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of the largest foreground part, distance of each pixel from the background colour)."""
    frame = np.ones(pixels.shape[:2], dtype=bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    background = np.median(pixels[frame], axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    contrast = float(np.percentile(distance, 99))
    if contrast < MIN_CONTRAST:
        return np.zeros(distance.shape, dtype=bool), distance
    labels, count = ndimage.label(distance > 0.5 * contrast)
    if count == 0:
        return np.zeros(distance.shape, dtype=bool), distance
    sizes = ndimage.sum_labels(np.ones_like(distance), labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes)), distance


def name_colour(rgb: np.ndarray) -> str:
    """The generator's colour word nearest to an RGB triple in [0, 1]."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if saturation < MIN_SATURATION:
        return min(GREYS, key=lambda name: abs(GREYS[name] - value))
    degrees = hue * 360.0
    return min(HUES, key=lambda name: abs((degrees - HUES[name] + 180.0) % 360.0 - 180.0))


def shape_features(mask: np.ndarray) -> ShapeFeatures:
    filled = ndimage.binary_fill_holes(mask)
    ys, xs = np.nonzero(filled)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    weight = dx * dx + dy * dy  # outer pixels carry the corners and points
    angle = np.arctan2(dy, dx)
    harmonics = [float(abs((weight * np.exp(1j * n * angle)).sum()) / max(weight.sum(), 1e-9)) for n in (3, 4, 5)]
    return ShapeFeatures(float(filled.sum() - mask.sum()) / max(float(filled.sum()), 1.0), *harmonics)


@functools.cache
def shape_prototypes() -> dict[str, np.ndarray]:
    """The features of each shape drawn large by the generator itself (no blur, no pixel effects)."""
    size = 256
    return {
        shape: shape_features(shape_mask(shape, (size / 2, size / 2), size * 0.4, size) > 0.5).vector()
        for shape in SHAPES
    }


def name_shape(features: ShapeFeatures) -> str:
    """The shape whose prototype is nearest in feature space; blur shrinks the harmonics and
    noise adds small ones, and the prototypes are 0.25 or more apart in every pair."""
    vector = features.vector()
    prototypes = shape_prototypes()
    return min(prototypes, key=lambda shape: float(np.linalg.norm(prototypes[shape] - vector)))


def classify(image: Image.Image | np.ndarray) -> Reading:
    """(colour, shape) of a toy image; ``unknown`` for a part that cannot be read (no foreground)."""
    pixels = _as_array(image)
    mask, distance = foreground_mask(pixels)
    if mask.sum() < MIN_PIXELS:
        return Reading(UNKNOWN, UNKNOWN)
    core = mask & (distance >= np.percentile(distance[mask], 50))
    colour = name_colour(np.median(pixels[core], axis=0))
    features = shape_features(mask)
    return Reading(colour, name_shape(features), features)
