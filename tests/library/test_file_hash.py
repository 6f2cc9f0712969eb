"""The base model's SHA-256 is hashed on another thread from start-up, and the metadata gets the same digest."""

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import sdxl_train_network
import train_network
from library import file_hash
from library.training import network_trainer, sdxl_trainer

REPO = Path(__file__).resolve().parents[2]


def wait_for_prefetches() -> None:
    for thread in threading.enumerate():
        if thread.name == "sha256-prefetch":
            thread.join()


def test_prefetched_digest_is_the_files_and_is_used(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 5000)
    file_hash.prefetch_sha256(path)
    wait_for_prefetches()
    monkeypatch.setattr(file_hash, "sha256_file", lambda _: "computed again")
    assert file_hash.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(b"rewritten")  # another size: the prefetched digest no longer describes it
    assert file_hash.file_sha256(path) == "computed again"


def test_a_failed_prefetch_is_hashed_again(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"weights")
    real = file_hash.sha256_file
    monkeypatch.setattr(file_hash, "sha256_file", lambda _: (_ for _ in ()).throw(OSError("disk went away")))
    file_hash.prefetch_sha256(path)
    wait_for_prefetches()
    monkeypatch.setattr(file_hash, "sha256_file", real)
    assert file_hash.file_sha256(path) == hashlib.sha256(b"weights").hexdigest()


def test_folders_and_missing_files_start_nothing(tmp_path):
    before = threading.active_count()
    file_hash.prefetch_sha256(tmp_path)
    file_hash.prefetch_sha256(tmp_path / "missing.safetensors")
    file_hash.prefetch_sha256(None)
    assert threading.active_count() == before


def test_scripts_start_hashing_before_the_heavy_imports(tmp_path, monkeypatch):
    out = subprocess.run(
        [sys.executable, "-c", "import sys, library.file_hash; print('torch' in sys.modules)"],
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "False"
    model, vae = tmp_path / "model.safetensors", tmp_path / "vae.safetensors"
    started = []
    monkeypatch.setattr(file_hash, "prefetch_sha256", started.append)
    monkeypatch.setattr(network_trainer.NetworkTrainer, "train", lambda self: None)
    monkeypatch.setattr(sdxl_trainer.SDXLNetworkTrainer, "train", lambda self: None)
    for script in (train_network, sdxl_train_network):
        started.clear()
        script.main(["--pretrained_model_name_or_path", str(model), "--vae", str(vae), "--output_dir", str(tmp_path)])
        assert started == [str(model), str(vae)]
