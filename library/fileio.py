"""Reading weight files safely and writing outputs atomically."""

from __future__ import annotations

import _compat_pickle
import contextlib
import logging
import os
import pickle
import pickletools
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from library.errors import CheckpointError
from library.weights_reader import DtypeFor, cast_tensor, copies_when_read, read_safetensors_unmapped, stored_dtypes
from networks.lora_file import atomic_path, fsync_directory, fsync_file, umask

logger = logging.getLogger(__name__)
TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder`` to the disk, before it is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_directory(root)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder (durable too); refuses to replace a non-empty folder."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"output folder '{path}' already exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp creates an owner-only folder
        fsync_tree(tmp)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
        fsync_directory(path.parent)
    finally:
        if tmp.exists():
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


# Globals a checkpoint pickle may name that exist to run code or reach the system. A genuine
# checkpoint never names them, so a file that does is refused with its name (every other unknown
# global only becomes an inert stand-in).
_CODE_RUNNING_MODULES = frozenset(
    "os posix nt sys subprocess shutil importlib runpy pickle _pickle marshal code codeop ctypes socket pty "
    "multiprocessing webbrowser".split()
)
_CODE_RUNNING_BUILTINS = frozenset(
    "eval exec compile open __import__ getattr setattr delattr globals locals vars breakpoint input "
    "exit quit help apply execfile".split()
)


class PickledStandIn:
    """An inert object in place of a class or function a checkpoint pickle names.

    SD1.x ``.ckpt`` files pickle PyTorch Lightning callbacks, ``argparse.Namespace`` hparams and numpy
    scalars beside the weights. Importing those names would run code, so each becomes a subclass of
    this class that only records what it was built from; the tensors around it load as usual.
    """

    pickled_name = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.pickled_args = args

    def __setstate__(self, state):
        self.pickled_state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


def _globals_in_pickles(file, count: int) -> set[str]:
    """``module.name`` of every GLOBAL in the first ``count`` pickles of ``file`` (torch's legacy format
    stores several in a row); read as opcodes, nothing is built or called."""
    names: set[str] = set()
    for _ in range(count):
        try:
            for opcode, arg, _pos in pickletools.genops(file):
                if opcode.name == "GLOBAL":
                    module, name = arg.split(" ", 1)
                    names.add(f"{module}.{name}")
        except ValueError:  # end of the pickles (raw storage bytes follow)
            break
    return names


def _unsafe_globals(path: Path) -> list[str]:
    """The globals in a torch checkpoint that torch's weights-only unpickler does not allow by itself."""
    if zipfile.is_zipfile(path):
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with open(path, "rb") as f:
        named = _globals_in_pickles(f, count=5)
    # torch's own allow-list wins over added names, so only its obvious roots are left out here.
    return sorted(n for n in named if not n.startswith(("torch.", "collections.", "_codecs.")))


def _refuse_code(path: Path, names: list[str]) -> None:
    for pickled_name in names:
        module, _, name = pickled_name.rpartition(".")
        # Protocol 2 writes Python 2 names (commands.Popen, __builtin__.exec); pickle maps them back.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full_name, root = f"{module}.{name}", module.split(".")[0]
        if root in _CODE_RUNNING_MODULES or (root == "builtins" and name in _CODE_RUNNING_BUILTINS):
            raise CheckpointError(
                f"refusing to load '{path}': its pickle names {full_name}, which runs code; "
                "only weights are read from .ckpt/.pt files"
            )


def torch_load_weights(path: str | os.PathLike, *, mmap: bool = False) -> object:
    """``torch.load`` that never runs code from the file.

    ``mmap``: map the tensors of a zip-format file (torch >= 1.6's) instead of reading them, so
    looking at a checkpoint's keys costs no memory and a load never holds the whole file beside the
    tensors; legacy (pre-zip) files are read as before.

    torch's weights-only unpickler builds only tensors, storages and plain containers; it takes an
    allow-list of extra globals, which here maps every other name the file holds to an inert
    :class:`PickledStandIn` (so Lightning-era checkpoints load). Names of code-running functions
    (``os.system``, ``builtins.exec``, ``subprocess.Popen``...) are refused with one line.
    """
    path = Path(path)
    try:
        names = _unsafe_globals(path)
        _refuse_code(path, names)
        stand_ins = [(type(n.rpartition(".")[2], (PickledStandIn,), {"pickled_name": n}), n) for n in names]
        if names:
            logger.info("'%s': %d pickled non-tensor objects read as inert stand-ins: %s", path, len(names), names)
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"cannot load '{path}' as weights: its pickle is corrupt or holds more than tensors and plain data "
            f"({_unpickling_reason(err)})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint '{path}': truncated or corrupt file ({reason})") from err


def _unpickling_reason(err: Exception) -> str:
    """The specific line of torch's long weights-only message (e.g. ``Unsupported operand 149``)."""
    text = str(err)
    _, marker, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_state_dict(
    path: str | os.PathLike,
    *,
    mmap: bool = True,
    dtype: DtypeFor = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Load every tensor of a ``.safetensors`` or torch checkpoint (onto the CPU unless ``device``).

    ``dtype`` (one dtype, or a function of the key) casts floating tensors as they are read, so a
    fp16 file never sits beside its fp32 copy. Unmapped reads serve ``mmap=False`` (kohya's
    ``--disable_mmap_load_safetensors``) and every tensor that is cast: a cast copies it anyway, and
    the mapped pages it read would stay resident beside the copy until the file closed. A tensor
    used as stored is the file's mapped pages (no copy at all), also when others are cast. Raises
    :class:`CheckpointError` with the file name for missing, truncated or foreign files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            if not mmap:
                return read_safetensors_unmapped(path, dtype=dtype, device=device)
            stored = stored_dtypes(path)
            cast = {key for key, kind in stored.items() if kind and copies_when_read(kind, key, dtype, device)}
            tensors = read_safetensors_unmapped(path, dtype=dtype, device=device, keys=cast) if cast else {}
            if len(cast) < len(stored):  # the rest are used as the file's mapped pages
                with safe_open(str(path), framework="pt", device="cpu") as file:  # handles are not iterable
                    tensors.update({key: file.get_tensor(key) for key in stored if key not in cast})
            return {key: tensors[key] for key in stored}
        loaded = torch_load_weights(path, mmap=mmap)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint '{path}': truncated or corrupt file ({reason})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(loaded).__name__}, not a dict of tensors")
    out = {}
    for key in [k for k, v in loaded.items() if isinstance(v, torch.Tensor)]:
        out[key] = cast_tensor(loaded.pop(key), key, dtype, device)
    return out


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
