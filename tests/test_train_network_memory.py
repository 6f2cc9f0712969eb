"""Freeing what training no longer needs, and SD1/SD2 --cache_text_encoder_outputs (issue 14)."""

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import train_network
from library.data.text_encoder_cache import te_outputs_npz_path
from library.errors import SuiteError
from library.models.fingerprint import weights_fingerprint
from library.models.stable_diffusion import load_stable_diffusion
from library.training import skeleton
from library.training.args import parse_args, train_network_parser
from library.training.network_trainer import NetworkTask, NetworkTrainer
from tests.test_train_network import base_argv

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
CACHED = ("--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only")


class RecordingTask(NetworkTask):
    """Records each step's loss and, while the text encoder is still loaded, cached vs live conditioning."""

    losses: list[float]
    live_vs_cached: list[bool]

    def training_step(self, batch):
        loss, logs = super().training_step(batch)
        self.losses.append(loss.item())
        if self.text_outputs is not None and not hasattr(self.model.text_encoder, "name"):
            cached = self.unet_conditioning(batch)["encoder_hidden_states"]
            outputs, self.text_outputs = self.text_outputs, None
            with torch.no_grad():
                live = self.unet_conditioning(batch)["encoder_hidden_states"]
            self.text_outputs = outputs
            self.live_vs_cached.append(torch.equal(cached, live))
        return loss, logs


class RecordingTrainer(NetworkTrainer):
    """Keeps weak references to the VAE and text encoder as they were before the release."""

    task_class = RecordingTask

    def release_unneeded(self, inputs, plan):
        self.refs = {"vae": weakref.ref(inputs.model.vae), "text_encoder": weakref.ref(inputs.model.text_encoder)}
        plan.task.losses, plan.task.live_vs_cached = [], []
        super().release_unneeded(inputs, plan)
        gc.collect()
        self.alive = {name: ref() is not None for name, ref in self.refs.items()}


def run(tiny_sd, data, *extra) -> tuple[RecordingTrainer, RecordingTask]:
    args = parse_args(train_network_parser(), base_argv(tiny_sd, data, *extra))
    trainer = RecordingTrainer(args)
    return trainer, trainer.train()


def test_vae_and_text_encoder_are_freed_once_their_outputs_are_cached(tiny_sd, data):
    trainer, task = run(tiny_sd, data, *CACHED)
    assert trainer.alive == {"vae": False, "text_encoder": False}
    assert len(task.losses) == 4 and all(np.isfinite(task.losses))
    assert (data / "out" / "tiny.safetensors").is_file()
    with pytest.raises(RuntimeError, match="vae was freed"):
        task.model.vae.encode(torch.zeros(1, 3, 64, 64))


def test_only_the_vae_is_freed_without_text_encoder_cache(tiny_sd, data, monkeypatch):
    trims = []
    monkeypatch.setattr(skeleton, "return_free_heap", lambda: trims.append(1))
    trainer, _ = run(tiny_sd, data, "--cache_latents")
    assert trainer.alive == {"vae": False, "text_encoder": True}
    assert len(trims) == 2  # the heap is trimmed after loading and after the release


def test_nothing_is_freed_when_sampling_and_samples_still_come_out(tiny_sd, data):
    prompts = data / "prompts.txt"
    prompts.write_text("sks toy, red, cube --w 64 --h 64 --s 2 --d 5\n")
    sampling = ("--sample_prompts", str(prompts), "--sample_every_n_steps", "4")
    trainer, _ = run(tiny_sd, data, *CACHED, *sampling)
    assert trainer.alive == {"vae": True, "text_encoder": True}
    assert len(list((data / "out" / "sample").glob("tiny_000004_00_*_5.png"))) == 1


def test_highvram_keeps_the_models(tiny_sd, data):
    trainer, _ = run(tiny_sd, data, *CACHED, "--highvram")
    assert trainer.alive == {"vae": True, "text_encoder": True}


def test_cached_text_encoder_outputs_equal_live_ones_bit_for_bit(tiny_sd, data):
    # --highvram keeps the text encoder, so every step compares the cache with a live encoding
    _, task = run(tiny_sd, data, *CACHED, "--highvram", "--clip_skip", "2", "--max_token_length", "150")
    assert task.live_vs_cached == [True] * 4
    hidden = next(iter(task.text_outputs.values()))[0]
    assert hidden.shape == (152, task.model.text_encoder.config.hidden_size) and hidden.dtype == torch.float32


def test_training_with_the_cache_gives_the_same_losses(tiny_sd, data):
    _, live = run(tiny_sd, data, "--cache_latents", "--network_train_unet_only", "--output_name", "live")
    _, cached = run(tiny_sd, data, *CACHED, "--output_name", "cached")
    assert cached.losses == live.losses


def test_disk_cache_is_written_in_kohyas_format_and_reused(tiny_sd, data):
    _, first = run(tiny_sd, data, *CACHED, "--cache_text_encoder_outputs_to_disk", "--output_name", "a")
    image = next(p for p in (data / "img").rglob("*.png"))
    key = next(k for k in first.text_outputs if k.endswith(image.stem) or image.stem in k)
    caption = image.with_suffix(".txt").read_text().strip()
    with np.load(te_outputs_npz_path(image)) as npz:
        assert set(npz.files) == {"hidden_state1", "clip_skip", "caption", "text_encoder_fingerprint"}
        assert int(npz["clip_skip"]) == 0
        assert np.array_equal(npz["hidden_state1"], first.text_outputs[key][0].numpy())
        assert str(npz["caption"]) == caption
        fingerprint = str(npz["text_encoder_fingerprint"])
    model = load_stable_diffusion(tiny_sd.sd1_dir, tokenizer_cache_dir=tiny_sd.tokenizer_cache_dir)
    assert fingerprint == weights_fingerprint(model.text_encoder)  # the text encoder trained on
    marked = {
        "hidden_state1": np.full((77, 8), 3.0, np.float32),
        "clip_skip": np.array(0),
        "caption": caption,
        "text_encoder_fingerprint": fingerprint,
    }
    np.savez(te_outputs_npz_path(image), **marked)  # a valid file is reused as it is
    _, second = run(tiny_sd, data, *CACHED, "--cache_text_encoder_outputs_to_disk", "--output_name", "b")
    assert torch.equal(second.text_outputs[key][0], torch.full((77, 8), 3.0))
    # one written by another checkpoint's text encoder is encoded again (kohya would train on it)
    np.savez(te_outputs_npz_path(image), **{**marked, "text_encoder_fingerprint": "0" * 16})
    _, other = run(tiny_sd, data, *CACHED, "--cache_text_encoder_outputs_to_disk", "--output_name", "o")
    assert torch.equal(other.text_outputs[key][0], first.text_outputs[key][0])
    # an edited caption (or a file without one, as kohya writes them) is encoded again
    image.with_suffix(".txt").write_text(caption + ", edited\n")
    _, edited = run(tiny_sd, data, *CACHED, "--cache_text_encoder_outputs_to_disk", "--output_name", "e")
    assert not torch.equal(edited.text_outputs[key][0], torch.full((77, 8), 3.0))
    with np.load(te_outputs_npz_path(image)) as npz:
        assert str(npz["caption"]) == caption + ", edited"
    np.savez(te_outputs_npz_path(image), **{k: v for k, v in marked.items() if k != "caption"})
    _, kohyas = run(tiny_sd, data, *CACHED, "--cache_text_encoder_outputs_to_disk", "--output_name", "k")
    assert not torch.equal(kohyas.text_outputs[key][0], torch.full((77, 8), 3.0))
    # another --clip_skip (or an SDXL file with other keys) is recomputed, not reused
    _, third = run(tiny_sd, data, *CACHED, "--cache_text_encoder_outputs_to_disk", "--clip_skip", "2")
    with np.load(te_outputs_npz_path(image)) as npz:
        assert int(npz["clip_skip"]) == 2 and not np.array_equal(npz["hidden_state1"], marked["hidden_state1"])
    assert not torch.equal(third.text_outputs[key][0], first.text_outputs[key][0])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--cache_text_encoder_outputs",), "--cache_text_encoder_outputs needs --network_train_unet_only"),
        (("--cache_text_encoder_outputs_to_disk",), "--cache_text_encoder_outputs needs --network_train_unet_only"),
        (CACHED + ("--shuffle_caption",), "shuffle_caption"),
        (CACHED + ("--caption_dropout_rate", "0.1"), "caption_dropout_rate"),
        (CACHED + ("--caption_dropout_every_n_epochs", "2"), "caption_dropout_every_n_epochs"),
        (CACHED + ("--caption_tag_dropout_rate", "0.1"), "caption_tag_dropout_rate"),
        (CACHED + ("--token_warmup_step", "2"), "token_warmup_step"),
        (CACHED + ("--weighted_captions",), "--weighted_captions"),
    ],
    ids=["te", "to-disk-te", "shuffle", "dropout", "dropout-epochs", "tag-dropout", "warmup", "weighted"],
)
def test_refused_combinations_fail_with_one_line_before_the_model_loads(tiny_sd, data, extra, message):
    argv = base_argv(tiny_sd, data, *extra)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(data / "no_such_model")  # never reached
    with pytest.raises(SuiteError) as err:
        train_network.main(argv)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (data / "out").exists()


def test_kohyas_loading_flags_train_the_same_on_a_single_file(tiny_sd, data):
    single = ("--pretrained_model_name_or_path", str(tiny_sd.sd1_file), "--tokenizer_cache_dir")
    single += (str(tiny_sd.tokenizer_cache_dir), "--cache_latents")
    _, plain = run(tiny_sd, data, *single, "--output_name", "plain")
    _, flagged = run(tiny_sd, data, *single, "--lowram", "--disable_mmap_load_safetensors", "--output_name", "flags")
    assert flagged.losses == plain.losses and len(plain.losses) == 4


def test_sdxl_frees_both_text_encoders_and_the_vae_once_cached(tiny_sd, data):
    from library.training.sdxl_args import sdxl_train_network_parser
    from library.training.sdxl_trainer import SDXLNetworkTrainer
    from tests.test_sdxl_train_network import sdxl_argv

    class Recording(SDXLNetworkTrainer):
        def release_unneeded(self, inputs, plan):
            model = inputs.model
            refs = {name: weakref.ref(getattr(model, name)) for name in ("vae", "text_encoder", "text_encoder_2")}
            super().release_unneeded(inputs, plan)
            gc.collect()
            self.alive = {name: ref() is not None for name, ref in refs.items()}

    args = parse_args(sdxl_train_network_parser(), sdxl_argv(tiny_sd, data, *CACHED))
    trainer = Recording(args)
    trainer.train()
    assert trainer.alive == {"vae": False, "text_encoder": False, "text_encoder_2": False}
    assert (data / "out" / "tiny.safetensors").is_file()


TRIM_PROBE = """
import torch
from library.training.memory import return_free_heap

def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) * 1024

block = torch.ones(20 * 2**20, dtype=torch.uint8)
del block  # a freed mmapped block raises glibc's mmap threshold to its size
kept = [torch.ones(2**20, dtype=torch.uint8) for _ in range(300)]  # now on the heap
kept = kept[-1:]  # the last one pins the heap's top: nothing below it goes back by itself
before = rss()
assert return_free_heap()
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_free_heap_pages_go_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, cwd=REPO, check=True)
    assert int(out.stdout) > 200 * 2**20  # of the ~299 MiB freed below the pinned top
