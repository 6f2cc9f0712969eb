"""What a resize keeps, as text: the ``--verbose`` table, the summary, and the ``--sweep`` preview.

The preview answers the question users otherwise answer with one resize run per setting (file
size and quality for sv_ratio 128, 96, ... 2): all figures come from the singular values alone.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
from dataclasses import dataclass, replace

import torch

from library.errors import ConfigError
from library.resize.rank_reduction import ModuleResize, ModuleSpectrum, ResizeRequest, resized_metadata
from networks.svd import retention

# safetensors dtype names, for the header size estimate
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_HASH_METADATA = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
TensorSpec = tuple[torch.dtype, tuple[int, ...]]


def safetensors_size(tensors: dict[str, TensorSpec], metadata: dict[str, str]) -> int:
    """Size in bytes of a safetensors file holding ``tensors`` (dtype, shape) and ``metadata``.

    Rebuilds the JSON header the format writes (tensors by name, 8-byte padding); data offsets are
    laid out in name order, which can change the header by a few digits, never more. Hand-written:
    safetensors has no way to size a file without serializing every tensor.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + header_bytes + (-header_bytes) % 8 + offset


def format_size(num_bytes: int) -> str:
    """Binary units, as file managers show LoRA sizes (the article's "1.16GB" is 1.16 GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes} B"


def rank_histogram(ranks: list[int]) -> str:
    """Counts of ranks in power-of-two bins: ``1:3 2:40 3-4:100 5-8:7``."""
    bins = collections.Counter(1 << max(rank - 1, 0).bit_length() for rank in ranks)
    labels = {upper: str(upper) if upper <= 2 else f"{upper // 2 + 1}-{upper}" for upper in bins}
    return " ".join(f"{labels[upper]}:{bins[upper]}" for upper in sorted(bins))


def _percent(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.1%}"


def module_table(modules: list[ModuleResize]) -> str:
    """kohya's ``--verbose`` figures per module, as a table, plus why a module kept its rank."""
    width = max(len(m.module.name) for m in modules)
    lines = [f"{'module':<{width}}  old  new      alpha  sum(S)    fro  max(S) ratio  note"]
    for m in modules:
        alpha = "-" if m.new_alpha is None else f"{m.new_alpha:g}"
        note = ""
        if m.choice.capped_at_input:
            note = f"input rank kept (kohya's rule: {m.choice.kohya_rank}, adding zero singular values)"
        elif m.copied:
            note = "unchanged"
        lines.append(
            f"{m.module.name:<{width}}  {m.module.old_rank:>3}  {m.choice.rank:>3}  {alpha:>9}"
            f"  {_percent(m.retention.sum_retained):>6}  {_percent(m.retention.fro_retained):>6}"
            f"  {m.retention.max_ratio:>12.1f}  {note}".rstrip()
        )
    return "\n".join(lines)


def summary(modules: list[ModuleResize], size: int) -> str:
    """kohya's closing line (mean Frobenius retention and its spread) plus the output size and ranks."""
    retained = [m.retention.fro_retained for m in modules if not math.isnan(m.retention.fro_retained)]
    mean = statistics.fmean(retained) if retained else float("nan")
    spread = statistics.pstdev(retained) if retained else float("nan")
    ranks = rank_histogram([m.choice.rank for m in modules])
    return (
        f"Average Frobenius norm retention: {_percent(mean)} | std: {spread:0.3f}\n"
        f"output: {format_size(size)}, {len(modules)} modules, ranks {ranks}"
    )


@dataclass(frozen=True)
class SweepRow:
    """The outcome of one ``--sweep`` value, without writing the file."""

    value: float
    size: int
    mean_fro: float
    min_fro: float
    ranks: list[int]


def sweep_requests(request: ResizeRequest, values: list[float]) -> list[ResizeRequest]:
    """One request per value: ``--dynamic_param`` with a dynamic method, else ``--new_rank`` (and conv rank)."""
    if request.dynamic_method:
        return [replace(request, dynamic_param=float(v)) for v in values]
    if any(v != int(v) or v < 1 for v in values):
        raise ConfigError("--sweep values are ranks without --dynamic_method: use whole numbers >= 1")
    return [replace(request, new_rank=int(v)) for v in values]


def output_size(
    spectra: list[ModuleSpectrum],
    ranks: list[int],
    other_tensors: dict[str, TensorSpec],
    metadata: dict[str, str],
    save_dtype: torch.dtype,
) -> int:
    """Exact size of the resized safetensors file with these ranks (``metadata`` as written, hashes included)."""
    tensors = dict(other_tensors)
    for module, rank in zip(spectra, ranks):
        tensors[module.pair.down_key] = (save_dtype, (rank, *module.down_tail))
        tensors[module.pair.up_key] = (save_dtype, (module.out_features, rank) + ((1, 1) if module.is_conv else ()))
        if module.scale is not None:
            tensors[module.pair.alpha_key] = (save_dtype, ())
    return safetensors_size(tensors, metadata | _HASH_METADATA)


def sweep_row(
    spectra: list[ModuleSpectrum],
    request: ResizeRequest,
    value: float,
    other_tensors: dict[str, TensorSpec],
    metadata: dict[str, str],
    save_dtype: torch.dtype,
) -> SweepRow:
    """Ranks, retention and file size ``request`` would give, from the spectra alone."""
    ranks = [module.choose(request).rank for module in spectra]
    fro = [retention(module.spectrum, rank).fro_retained for module, rank in zip(spectra, ranks)]
    max_old = max(m.old_rank for m in spectra)
    written = resized_metadata(metadata, request, max_old, 1.0)
    fro = [f for f in fro if not math.isnan(f)] or [float("nan")]
    size = output_size(spectra, ranks, other_tensors, written, save_dtype)
    return SweepRow(value, size, statistics.fmean(fro), min(fro), ranks)


def sweep_table(rows: list[SweepRow], label: str, input_size: int) -> str:
    """One line per swept value: size (and share of the input), mean/min Frobenius retention, rank bins."""
    lines = [f"{label:>14}  {'size':>10}  {'of input':>8}  {'fro mean':>8}  {'fro min':>7}  ranks"]
    for row in rows:
        lines.append(
            f"{row.value:>14g}  {format_size(row.size):>10}  {row.size / input_size:>8.1%}"
            f"  {_percent(row.mean_fro):>8}  {_percent(row.min_fro):>7}  {rank_histogram(row.ranks)}"
        )
    return "\n".join(lines)
