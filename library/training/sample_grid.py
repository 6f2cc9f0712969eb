"""One contact sheet from a run's ``sample/`` folder: a row per prompt, a column per step or epoch.

kohya writes each sample as ``<name>_<000500|e000002>_<prompt index>_<timestamp>[_seed].png``;
reading a training run means comparing the same prompt across checkpoints, which this lays out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from library.errors import ConfigError

# <name>_<step or e+epoch>_<prompt index>_<14-digit timestamp>[_seed].png; the name may hold underscores.
SAMPLE_NAME = re.compile(r"^(?:(?P<name>.*)_)?(?P<when>e?\d{6})_(?P<prompt>\d{2})_\d{14}(?:_-?\d+)?\.png$")


def sample_files(folder: str | os.PathLike, output_name: str | None = None) -> dict[tuple[str, int], Path]:
    """kohya's sample images in ``folder`` by (step or ``e``-epoch label, prompt index); the newest
    file wins where a resumed run wrote the same cell twice."""
    found: dict[tuple[str, int], Path] = {}
    for path in sorted(Path(folder).glob("*.png")):  # the timestamp sorts the same cell's files by age
        match = SAMPLE_NAME.match(path.name)
        if match and (output_name is None or match["name"] == output_name):
            found[(match["when"], int(match["prompt"]))] = path
    if not found:
        raise ConfigError(f"'{folder}' holds no kohya sample images (<name>_<step>_<prompt>_<timestamp>.png)")
    return found


def _order(label: str) -> tuple[int, int]:
    return (1, int(label[1:])) if label.startswith("e") else (0, int(label))


def contact_sheet(files: dict[tuple[str, int], Path], gap: int = 2) -> Image.Image:
    """Rows: prompt indices; columns: steps (or epochs) in order; missing cells stay white."""
    columns = sorted({when for when, _ in files}, key=_order)
    rows = sorted({prompt for _, prompt in files})
    with Image.open(next(iter(files.values()))) as first:
        width, height = first.size
    sheet = Image.new("RGB", (len(columns) * (width + gap) - gap, len(rows) * (height + gap) - gap), "white")
    for (when, prompt), path in files.items():
        with Image.open(path) as image:
            cell = image.convert("RGB").resize((width, height))
        sheet.paste(cell, (columns.index(when) * (width + gap), rows.index(prompt) * (height + gap)))
    return sheet
