"""Reading weight files safely and writing outputs atomically."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from library.errors import CheckpointError
from networks.lora_file import atomic_path, umask

TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder; refuses to replace a non-empty folder."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"output folder '{path}' already exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp creates an owner-only folder
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def save_state_dict(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as safetensors (by extension) or a torch pickle, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata=metadata)
        elif path.suffix in TORCH_EXTENSIONS:
            torch.save(tensors, tmp)
        else:
            raise CheckpointError(f"cannot save '{path}': use a .safetensors, .ckpt, .pt or .pth name")


class _StubGlobal:
    """Stands in for classes a checkpoint pickle names but that we never want to import."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _RestrictedUnpickler(pickle.Unpickler):
    # Lightning-era .ckpt files pickle callback objects next to the weights. Importing their
    # classes would execute arbitrary code, so anything outside torch/numpy/collections becomes
    # an inert stub and only the tensors survive.
    _allowed_roots = ("torch", "numpy", "collections", "builtins", "_codecs")

    def find_class(self, module: str, name: str):
        if module.split(".")[0] in self._allowed_roots:
            return super().find_class(module, name)
        return _StubGlobal


_restricted_pickle = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler, load=pickle.load, __name__="restricted_pickle"
)


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of a ``.safetensors`` or torch checkpoint onto the CPU.

    Raises :class:`CheckpointError` with the file name for missing, truncated or foreign files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        loaded = _torch_load(path)
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint '{path}': truncated or corrupt file ({reason})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(loaded).__name__}, not a dict of tensors")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors file (empty for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read '{path}': truncated or corrupt safetensors file ({err})") from err
