"""kohya's documented command line, ``python networks/resize_lora.py ...``, runs the suite's resize_lora.py.

A shim: it puts the repository root first on ``sys.path`` and calls the top-level script's main.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.cli import run_cli  # the root must be on sys.path first
from resize_lora import main

if __name__ == "__main__":
    run_cli(main)
