"""Reading and writing LoRA weight files the way kohya's sd-scripts does.

* ``.safetensors`` with string metadata and the ``sshs_model_hash`` / ``sshs_legacy_hash`` that
  A1111's additional-networks extension shows; ``.ckpt``/``.pt``/``.pth`` as a plain torch
  state dict (no metadata), like kohya.
* Writes go to a temporary file that is flushed to disk and then renamed into place, so neither a
  crash nor a power cut leaves half a file or loses the previous one.

This module imports only torch and safetensors: it is part of ``networks/``, which kohya users copy
into their own checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from networks.errors import LoRAFileError

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000
_CHUNK = 1 << 20


def _hash_file(path: Path) -> tuple[str, str]:
    """(sha256 of the data section, first 8 hex of sha256 of 64 KiB at 1 MiB) of a safetensors file."""
    model, legacy = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        legacy_start = f.seek(_LEGACY_OFFSET)
        legacy.update(f.read(_LEGACY_LENGTH) if legacy_start == _LEGACY_OFFSET else b"")
        f.seek(0)
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            model.update(chunk)
    return model.hexdigest(), legacy.hexdigest()[:8]


def sshs_hashes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` of ``state_dict`` saved as safetensors.

    The model hash covers only the tensor data; the legacy hash reads bytes at offset 1 MiB of a
    file whose metadata holds only the ``ss_*`` keys, so it also depends on those.
    """
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hash.safetensors"
        save_file(_contiguous(state_dict), str(path), metadata=ss_only)
        return _hash_file(path)


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def umask() -> int:
    """The process umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk (a rename alone may reach the disk before the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries, so a rename into it survives a power cut (a no-op where folders
    cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    A crash or an error therefore never leaves a half-written output behind, and the old file stays
    until the new one is complete. ``durable`` also flushes the data before the rename and the
    folder after it, so a power cut cannot leave an empty file where the previous good one was
    (ext4 and XFS may otherwise write the rename first); caches that are cheap to rebuild skip it.
    The suite's one atomic write: ``library.fileio`` uses it too (library may import networks, not
    the reverse).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp creates owner-only files; outputs get the usual mode
        if durable:
            fsync_file(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            fsync_directory(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast every tensor, alpha included, as kohya's ``--save_precision`` does."""
    if dtype is None:
        return _contiguous(state_dict)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}


def save_lora_file(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Write a LoRA file atomically; returns the metadata actually written (with sshs hashes)."""
    path = Path(path)
    tensors = cast_state_dict(state_dict, dtype)
    written: dict[str, str] = {}
    if path.suffix != ".safetensors" and path.suffix not in TORCH_SUFFIXES:
        raise LoRAFileError(f"cannot save '{path}': use a .safetensors, .ckpt, .pt or .pth name")
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            written = {k: str(v) for k, v in (metadata or {}).items()}
            written["sshs_model_hash"], written["sshs_legacy_hash"] = sshs_hashes(tensors, written)
            save_file(tensors, str(tmp), metadata=written)
        else:
            torch.save(tensors, tmp)
    return written


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file; one-line :class:`LoRAFileError` naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise LoRAFileError(f"LoRA file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path)), metadata
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LoRAFileError(f"cannot read LoRA file '{path}': truncated or corrupt ({reason})") from err
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise LoRAFileError(f"'{path}' is not a state dict of tensors")
    return loaded, {}
