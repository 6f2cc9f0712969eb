"""A normal run prints only the suite's own lines: no third-party notices (bitsandbytes' kernels one)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tqdm bars (steps, latent caching) redraw with carriage returns; everything else must be ours.
PROGRESS = re.compile(r"^(steps|caching latents):")
OURS = re.compile(r"^(INFO|WARNING) (library|networks)\.")


def _foreign_lines(stderr: str) -> list[str]:
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip()]
    return [line for line in lines if not PROGRESS.match(line) and not OURS.match(line)]


@pytest.mark.slow
def test_quickstart_sized_run_prints_nothing_but_ours(tmp_path):
    made = subprocess.run(
        [sys.executable, "tools/make_toy_world.py", "--out", str(tmp_path / "toy"), "--per_combination", "1",
         "--concept", "purple triangle"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert made.returncode == 0 and _foreign_lines(made.stderr) == []
    dataset = (REPO / "examples" / "quickstart_toy_dataset.toml").read_text()
    assert dataset.count('"toy/') == 2
    (tmp_path / "dataset.toml").write_text(dataset.replace('"toy/', f'"{tmp_path}/toy/'))
    config = (REPO / "examples" / "quickstart.toml").read_text()
    for old, new in {
        '"assets/': f'"{REPO}/assets/',
        "examples/quickstart_toy_dataset.toml": str(tmp_path / "dataset.toml"),
        "output/quickstart": str(tmp_path / "out"),
        "examples/quickstart_prompts.txt": str(REPO / "examples" / "quickstart_prompts.txt"),
        "max_train_steps = 200": "max_train_steps = 2",
        "save_every_n_steps = 100": "save_every_n_steps = 1",
        "sample_every_n_steps = 50": "sample_every_n_steps = 2",
        'sample_sampler = "euler"': 'sample_sampler = "ddim"',  # kohya's default, whose scheduler diffusers warns on
    }.items():
        assert old in config
        config = config.replace(old, new)
    (tmp_path / "quickstart.toml").write_text(config)
    trained = subprocess.run(
        [sys.executable, "train_network.py", "--config_file", str(tmp_path / "quickstart.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "out" / "toy_lora.safetensors").is_file() and list((tmp_path / "out" / "sample").glob("*.png"))
    assert _foreign_lines(trained.stderr) == []
