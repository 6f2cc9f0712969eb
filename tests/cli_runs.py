"""Running a script's ``main`` in-process the way its command line ends: the exit status, errors as one line."""

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from library.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
# Runs a script as ``python script args`` would, then prints the heavy libraries it imported.
_IMPORTED = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit_:
    assert not exit_.code, exit_.code
print(sorted({"torch", "diffusers", "transformers"} & set(sys.modules)))
"""


def exit_status(main: Callable[[list[str]], None], *args) -> int:
    """``main``'s exit status for ``args`` (stringified), as ``python script.py ARGS`` would end."""
    try:
        run_cli(lambda: main([str(a) for a in args]))
    except SystemExit as exit_:
        return exit_.code
    return 0


def assert_one_line_refusal(main: Callable[[list[str]], None], argv: list[str], capsys) -> None:
    """``argv`` ends the command line with exit status 2 and exactly one ``error: --...`` line."""
    capsys.readouterr()
    assert exit_status(main, *argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --"), lines


def heavy_imports(script: str, *args) -> list[str]:
    """Which of torch, diffusers and transformers ``python script args`` imported (in a fresh process)."""
    argv = [sys.executable, "-c", _IMPORTED, script, *(str(a) for a in args)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.splitlines()[-1])  # the list printed last
