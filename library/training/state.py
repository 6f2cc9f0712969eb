"""``--save_state`` folders: written whole or not at all, read without running code, refused when incomplete.

The folder holds accelerate's files (``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``,
``custom_checkpoint_<i>.pkl`` for the trained network or student and EMA), our ``train_state.json``
counters, and ``state_manifest.json`` listing every file and its size, written last. It is built in
``.<name>.tmp`` beside its final place and renamed there when complete, so a killed save leaves the
previous state untouched. Resuming reads every file with torch's weights-only unpickler (accelerate's
own ``load_state`` unpickles the custom checkpoints with ``weights_only=False`` and skips RNG files it
cannot read), after checking the manifest: a folder missing any part is refused with one line.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from library.errors import CheckpointError
from library.fileio import fsync_tree

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"
MANIFEST_FILE = "state_manifest.json"
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.pt"


def rng_file(process_index: int) -> str:
    return f"random_states_{process_index}.pkl"


def object_file(index: int) -> str:
    return f"custom_checkpoint_{index}.pkl"


def temporary_state_path(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp"


def previous_state_path(path: Path) -> Path:
    return path.parent / f".{path.name}.old.tmp"


# ---- writing ------------------------------------------------------------------------------------


def write_manifest(folder: Path) -> None:
    """List every file with its size. Sizes, not hashes: they catch what a killed or full-disk write
    leaves (missing or short files) without reading gigabytes of optimizer state on every save."""
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def replace_folder(new: Path, path: Path) -> None:
    """Move the complete folder ``new`` to ``path``; an older ``path`` is removed only once ``new`` is there."""
    old = previous_state_path(path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def save_training_state(accelerator: Accelerator, path: Path, counters: dict[str, int]) -> None:
    """accelerate's ``save_state`` into a temporary folder, then counters, manifest and the rename.

    Every process calls this (each writes its RNG file); the main process finishes the folder.
    """
    tmp = temporary_state_path(path)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps({**counters, "num_processes": accelerator.num_processes}))
        write_manifest(tmp)
        fsync_tree(tmp)  # on disk before the rename, so a power cut keeps a complete older state
        replace_folder(tmp, path)
    accelerator.wait_for_everyone()


# ---- reading ------------------------------------------------------------------------------------


def verify_state_folder(path: Path, num_objects: int, process_index: int) -> dict[str, Any]:
    """The folder's counters, once every part it needs is there at its recorded size; else one line."""
    where = f"--resume '{path}'"
    if not path.is_dir():
        raise CheckpointError(f"{where} is not a folder written by --save_state")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{where} has no {MANIFEST_FILE}: it is incomplete (a save that was interrupted) "
            "or was written by another program; resume from an earlier state folder"
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
        counters = json.loads((path / TRAIN_STATE_FILE).read_text())
        step, epoch = int(counters["current_step"]), int(counters["current_epoch"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: unreadable {MANIFEST_FILE} or {TRAIN_STATE_FILE} ({err})") from err
    needed = [TRAIN_STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, rng_file(process_index)]
    needed += [object_file(i) for i in range(num_objects)]
    for name in needed:
        if name not in files:
            raise CheckpointError(f"{where} lacks {name} (saved by another script or with fewer processes?)")
    for name, size in files.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes, not {size}"
            raise CheckpointError(f"{where}: {name} is {found}; the folder is damaged, resume from another one")
    if step < 0 or epoch < 0:
        raise CheckpointError(f"{where}: {TRAIN_STATE_FILE} holds negative counters")
    return counters


def _load(path: Path, **kwargs) -> Any:
    """One state file through torch's weights-only unpickler (plus numpy's array types, as accelerate allows)."""
    try:
        return accelerate_load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing '{path}': it holds objects other than tensors and plain data, which could run code "
            "when loaded; state folders are read as data only"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read '{path}': truncated or corrupt file ({reason})") from err


def _restore_rng(states: dict) -> None:
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def load_training_state(
    accelerator: Accelerator, path: Path, optimizer, lr_scheduler, objects: list[Any]
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote; returns the counters of ``train_state.json``."""
    counters = verify_state_folder(path, len(objects), accelerator.process_index)
    optimizer_state = _load(path / OPTIMIZER_FILE, map_location="cpu")
    scheduler_state = _load(path / SCHEDULER_FILE)
    object_states = [_load(path / object_file(i), map_location="cpu") for i in range(len(objects))]
    rng_states = _load(path / rng_file(accelerator.process_index))
    scaler = getattr(accelerator, "scaler", None)
    scaler_state = _load(path / SCALER_FILE) if scaler is not None else None
    try:
        optimizer.load_state_dict(optimizer_state)
        lr_scheduler.load_state_dict(scheduler_state)
        for obj, state in zip(objects, object_states):
            obj.load_state_dict(state)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        _restore_rng(rng_states)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"--resume '{path}' does not fit this run's network or optimizer ({reason})") from err
    accelerator.step = int(rng_states.get("step", 0))
    return counters
