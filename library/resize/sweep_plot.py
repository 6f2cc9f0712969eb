"""``resize_lora.py --sweep_plot``: the ``--sweep`` table as a picture (file size against retained norm).

matplotlib is optional (not in requirements.txt): :func:`require_matplotlib` runs before any work so
a missing install costs the user nothing. The figure is drawn on matplotlib's object API with the
Agg canvas (no pyplot: no global state, no display needed).
"""

from __future__ import annotations

import os
from pathlib import Path

from library.errors import ConfigError
from library.resize.report import SweepRow
from networks.lora_file import atomic_path

MIB = 1024**2


def require_matplotlib(path: str | os.PathLike) -> None:
    """Refuse ``--sweep_plot`` up front when matplotlib is missing or cannot write ``path``'s format."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ConfigError("--sweep_plot needs matplotlib: pip install matplotlib") from None
    suffix = Path(path).suffix.lstrip(".").lower()
    formats = FigureCanvasAgg.get_supported_filetypes()
    if suffix not in formats:
        raise ConfigError(
            f"--sweep_plot '{path}': matplotlib cannot write '.{suffix}' files; name a .png, .svg or .pdf"
        )


def write_sweep_plot(rows: list[SweepRow], label: str, input_size: int, path: str | os.PathLike) -> None:
    """Output size (MiB) against the mean and minimum Frobenius norm retained, one point per swept value.

    Each point is labelled with its ``--dynamic_param`` (or ``--new_rank``) value; the title gives the
    input size, so the plot reads on its own. Written atomically, in the format of ``path``'s suffix.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sizes = [row.size / MIB for row in rows]
    axes.plot([100 * row.mean_fro for row in rows], sizes, "o-", label="mean over modules")
    axes.plot([100 * row.min_fro for row in rows], sizes, "x:", color="gray", label="worst module")
    for row, size in zip(rows, sizes):
        axes.annotate(f"{row.value:g}", (100 * row.mean_fro, size), textcoords="offset points", xytext=(5, 4))
    axes.set_xlabel("Frobenius norm of the update retained (%)")
    axes.set_ylabel("output file size (MiB)")
    axes.set_yscale("log")
    axes.set_title(f"--sweep over {label} (input: {input_size / MIB:.1f} MiB)")
    axes.margins(x=0.08, y=0.12)  # room for the value labels
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lstrip(".").lower())
