"""Several LoRAs in one ``resize_lora.py`` run: ``--model`` a folder or several files, ``--save_to`` a folder.

Every input and output name is checked before the first file is resized; each output is written
atomically, one pass per file, with a progress bar over the files.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from library.errors import ConfigError
from library.resize.files import OUTPUT_SUFFIXES, check_output_path


def input_files(models: list[str]) -> list[Path]:
    """The LoRA files named by ``--model``: one or more files, or one folder (its LoRA files, sorted)."""
    if len(models) == 1 and Path(models[0]).is_dir():
        folder = Path(models[0])
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in OUTPUT_SUFFIXES)
        if not files:
            raise ConfigError(f"--model folder '{folder}' holds no .safetensors, .ckpt, .pt or .pth file")
        return files
    missing = next((m for m in models if not Path(m).is_file()), None)
    if missing is not None:
        raise ConfigError(f"--model '{missing}' is not a file (several inputs must all be LoRA files)")
    return [Path(m) for m in models]


def is_batch(models: list[str]) -> bool:
    return len(models) > 1 or Path(models[0]).is_dir()


def output_files(inputs: list[Path], save_to: str | None) -> list[Path]:
    """``--save_to FOLDER/<input name>`` for each input; refuses a file name, clashes and overwriting an input."""
    if not save_to:
        raise ConfigError("--save_to is required: the folder for the resized LoRAs")
    folder = Path(save_to)
    if folder.suffix in OUTPUT_SUFFIXES or folder.is_file():
        raise ConfigError(f"--save_to '{folder}' must be a folder when --model names several LoRAs")
    outputs = [folder / path.name for path in inputs]
    if len(set(outputs)) != len(outputs):
        raise ConfigError("two --model files have the same name: they would overwrite each other in --save_to")
    for model, output in zip(inputs, outputs):
        check_output_path(model, output)
    return outputs


def resize_batch(models: list[str], save_to: str | None, resize_one) -> list[Path]:
    """Resize every input with ``resize_one(model, output)``; returns the outputs."""
    inputs = input_files(models)
    outputs = output_files(inputs, save_to)
    for model, output in tqdm(list(zip(inputs, outputs)), desc="files", unit="file"):
        resize_one(model, output)
    return outputs
