"""The contact sheet puts each kohya sample file in its prompt's row and its step's column."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from library.errors import ConfigError
from library.training.sample_grid import contact_sheet, sample_files
from library.training.sampling import sample_file_name

REPO = Path(__file__).resolve().parents[3]


def _write(folder: Path, name: str | None, prompt: int, colour: tuple[int, int, int], **when) -> None:
    Image.new("RGB", (8, 8), colour).save(folder / sample_file_name(name, prompt, 7, **when))


def test_rows_are_prompts_and_columns_steps_in_numeric_order(tmp_path):
    colours = {(step, prompt): (step % 251, 40 * prompt, 9) for step in (0, 50, 100, 1000) for prompt in (0, 1)}
    for (step, prompt), colour in colours.items():
        _write(tmp_path, "my_lora", prompt, colour, step=step)
    (tmp_path / "notes.png").write_bytes(b"")  # not a sample name: ignored
    sheet = contact_sheet(sample_files(tmp_path), gap=2)
    assert sheet.size == (4 * 10 - 2, 2 * 10 - 2)
    for column, step in enumerate((0, 50, 100, 1000)):
        for row in (0, 1):
            assert sheet.getpixel((column * 10 + 4, row * 10 + 4)) == colours[(step, row)]


def test_epochs_and_a_filter_by_output_name(tmp_path):
    _write(tmp_path, "a_b", 0, (255, 0, 0), epoch=2)
    _write(tmp_path, "a_b", 0, (0, 255, 0), epoch=10)
    _write(tmp_path, "other", 0, (0, 0, 255), epoch=1)
    files = sample_files(tmp_path, "a_b")
    assert sorted(files) == [("e000002", 0), ("e000010", 0)]
    sheet = contact_sheet(files, gap=0)
    assert sheet.getpixel((1, 1)) == (255, 0, 0) and sheet.getpixel((9, 1)) == (0, 255, 0)


def test_a_folder_without_samples_is_one_line_and_status_2(tmp_path):
    with pytest.raises(ConfigError, match="no kohya sample images"):
        sample_files(tmp_path)
    done = subprocess.run(
        [sys.executable, "tools/sample_grid.py", "--samples", str(tmp_path), "--out", str(tmp_path / "g.png")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and not (tmp_path / "g.png").exists()


def test_the_tool_writes_the_scaled_sheet(tmp_path):
    _write(tmp_path, None, 0, (1, 2, 3), step=5)
    done = subprocess.run(
        [sys.executable, "tools/sample_grid.py", "--samples", str(tmp_path), "--out", str(tmp_path / "g.png"),
         "--scale", "3"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (24, 24) and grid.getpixel((23, 23)) == (1, 2, 3)
