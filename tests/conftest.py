"""Shared fixtures. Everything runs offline on tiny models generated here."""

import logging
import os
import tempfile

# No test may reach a model hub or a user's cache: fail fast instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-empty-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU-only notes from bitsandbytes and diffusers' dtype-cast advice, logged on every import/cast.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)

import pytest  # noqa: E402
import torch  # noqa: E402

from library.tiny_sd import write_tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """The tiny SD1/SD2 models (folders + single files), tokenizers and DreamBooth dataset."""
    return write_tiny_sd(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    # Tiny models spend more time synchronising threads than computing: one thread per test
    # process is several times faster on a small shared CPU (pytest -n 2 uses both cores).
    # Session-wide, so module and session fixtures that run the tiny models get it too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_and_thread_count():
    torch.manual_seed(0)
    yield
    torch.set_num_threads(1)  # a test may change it (e.g. to check results across thread counts)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; every in-process training run starts from none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def data(tiny_sd, tmp_path):
    """A private copy of the tiny dataset (runs write latent caches beside the images)."""
    import shutil

    shutil.copytree(tiny_sd.train_data_dir, tmp_path / "img")
    shutil.copytree(tiny_sd.reg_data_dir, tmp_path / "reg")
    return tmp_path


@pytest.fixture(scope="session")
def code_payload(tmp_path_factory):
    """A torch file whose unpickling would run ``touch marker`` (written by another interpreter): what a
    malicious checkpoint or state file does. Returns the file and the marker that must never appear."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("payload")
    marker, file = root / "marker", root / "payload.pt"
    code = f"""
import subprocess, torch
class Payload:
    def __reduce__(self):
        return (subprocess.Popen, (["touch", {str(marker)!r}],))
torch.save({{"lora_unet_x.lora_down.weight": Payload()}}, {str(file)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return file, marker
