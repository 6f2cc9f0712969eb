"""Read a ``.safetensors`` file tensor by tensor with plain file reads (``--disable_mmap_load_safetensors``).

safetensors maps the file and copies each tensor out of the mapping; the pages read stay in the
process' resident set until the file is closed, so loading a checkpoint briefly holds it twice
(the mapped pages and the copies): 2x the file in host RAM, which is what runs a 16 GB machine out
of memory on a 6.9 GB SDXL file. Reading each tensor into its own buffer with ``readinto`` holds the
file once, plus nothing (the page cache is not the process' memory), and each tensor can be cast or
moved to the GPU as it is read. The safetensors library has no such reader, hence this one; the
format is the documented one (8-byte little-endian header size, a JSON header, raw little-endian data).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from library.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20
# One dtype for every floating tensor, or one per key (None: as stored).
DtypeFor = torch.dtype | Callable[[str], torch.dtype | None] | None


def cast_tensor(tensor: torch.Tensor, key: str, dtype: DtypeFor, device=None) -> torch.Tensor:
    """``tensor`` in the dtype ``dtype`` asks for ``key`` (floats only), on ``device``."""
    target = dtype(key) if callable(dtype) else dtype
    if target is not None and tensor.is_floating_point():
        tensor = tensor.to(target)
    return tensor.to(device) if device is not None else tensor


def _header(file, path: Path) -> tuple[dict, int]:
    raw = file.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"cannot read checkpoint '{path}': truncated or corrupt file (no header)")
    (size,) = struct.unpack("<Q", raw)
    if size > _MAX_HEADER:
        raise CheckpointError(f"cannot read checkpoint '{path}': truncated or corrupt file (header of {size} bytes)")
    try:
        header = json.loads(file.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read checkpoint '{path}': truncated or corrupt file ({err})") from err
    header.pop("__metadata__", None)
    return header, 8 + size


def copies_when_read(stored: torch.dtype, key: str, dtype: DtypeFor, device) -> bool:
    """Whether ``cast_tensor`` returns a new tensor (a cast or a move), so the read may use a shared buffer."""
    target = dtype(key) if callable(dtype) else dtype
    if target is not None and stored.is_floating_point and target != stored:
        return True
    return device is not None and torch.device(device).type != "cpu"


def stored_dtypes(path: str | os.PathLike) -> dict[str, torch.dtype | None]:
    """Each tensor's dtype as the file stores it, from the header alone (None: one this reader lacks)."""
    path = Path(path)
    with open(path, "rb", buffering=0) as file:
        header, _ = _header(file, path)
    return {name: DTYPES.get(info.get("dtype")) for name, info in header.items()}


def read_safetensors_unmapped(
    path: str | os.PathLike,
    *,
    dtype: DtypeFor = None,
    device: torch.device | str | None = None,
    keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The file's tensors (those in ``keys``, default all), read one at a time without a memory map;
    floats cast to ``dtype``, on ``device``.

    A tensor that is cast or moved is read into one scratch buffer reused for every such tensor
    (the size of the largest), so the file's bytes never take fresh memory of their own: fresh pages
    cost a fault each (on a virtual machine, a host fault), and thousands of freed read buffers
    leave the heap fragmented and raise glibc's mmap threshold for the rest of the run.
    """
    path = Path(path)
    end = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as file:
        header, start = _header(file, path)
        if keys is not None:
            header = {name: info for name, info in header.items() if name in keys}
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        for name, info in entries:
            begin, stop = info["data_offsets"]
            if info["dtype"] not in DTYPES or start + stop > end or stop < begin:
                raise CheckpointError(
                    f"cannot read checkpoint '{path}': truncated or corrupt file (tensor '{name}', {info['dtype']})"
                )
        scratch_size = max(
            (stop - begin for name, info in entries for begin, stop in [info["data_offsets"]]
             if copies_when_read(DTYPES[info["dtype"]], name, dtype, device)),
            default=0,
        )  # fmt: skip
        scratch = torch.empty(scratch_size, dtype=torch.uint8)
        for name, info in entries:
            begin, stop = info["data_offsets"]
            stored = DTYPES[info["dtype"]]
            copies = copies_when_read(stored, name, dtype, device)
            buffer = scratch[: stop - begin] if copies else torch.empty(stop - begin, dtype=torch.uint8)
            file.seek(start + begin)
            view = memoryview(buffer.numpy())
            read = 0
            while read < len(view):
                count = file.readinto(view[read:])
                if not count:
                    raise CheckpointError(f"cannot read checkpoint '{path}': truncated file (tensor '{name}')")
                read += count
            out[name] = cast_tensor(buffer.view(stored).reshape(info["shape"]), name, dtype, device)
    return out
