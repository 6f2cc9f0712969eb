"""The DreamBooth harness: kohya's flags reach train_network.py, the saved network is applied as a
consumer applies it, and the report scores the prompts it names."""

import numpy as np
import pytest

import train_network
from library.errors import ConfigError
from library.models.stable_diffusion import save_ldm_checkpoint
from library.toy_world.concept import (
    OTHER_REGULARISATION_FOLDER,
    RECIPE_FILE,
    Concept,
    write_concept_set,
)
from library.toy_world.dreambooth import (
    DreamBoothRun,
    apply_network_file,
    concept_report,
    load_base,
    report_jobs,
    train_network_argv,
)
from library.toy_world.evaluate import generate
from library.toy_world.generator import SHAPES, combination_split
from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer
from networks.lora_file import load_lora_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_db")
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(root / "tokenizers"))
    save_ldm_checkpoint(build_toy_model(tokenizer, seed=0), root / "toy.safetensors")
    write_concept_set(root / "concept", Concept("purple", "triangle"), images=2, repeats=2, reg_per_colour=1, seed=0)
    return root


@pytest.mark.parametrize("module", ["networks.lora", "networks.lilora"])
def test_a_trained_network_file_changes_what_the_base_model_draws(toy_files, tmp_path, module):
    run = DreamBoothRun(network_module=module, max_train_steps=3, train_batch_size=2, learning_rate=1e-2)
    model_file, tokenizers = toy_files / "toy.safetensors", toy_files / "tokenizers"
    train_network.main(train_network_argv(model_file, tokenizers, toy_files / "concept", tmp_path, run))
    weights, metadata = load_lora_file(tmp_path / "concept.safetensors")
    assert metadata["ss_network_module"] == module and metadata["ss_num_reg_images"] == "10"
    assert {key.split("_")[1] for key in weights} == {"unet", "te"}  # kohya's default trains both
    model = load_base(toy_files / "toy.safetensors", toy_files / "tokenizers")
    before = np.asarray(generate(model, ["a sks triangle"], [3], steps=2)[0], dtype=int)
    apply_network_file(model, tmp_path / "concept.safetensors", module)
    after = np.asarray(generate(model, ["a sks triangle"], [3], steps=2)[0], dtype=int)
    assert np.abs(after - before).max() > 0


def test_a_unet_only_run_passes_kohyas_flag():
    run = DreamBoothRun(train_text_encoder=False)
    assert "--network_train_unet_only" in train_network_argv("m", "t", "c", "o", run)
    assert "--network_train_unet_only" not in train_network_argv("m", "t", "c", "o", DreamBoothRun())


def test_prior_weight_and_scheduler_reach_kohyas_flags():
    default = train_network_argv("m", "t", "c", "o", DreamBoothRun())
    assert "--prior_loss_weight=1.0" in default and "--lr_scheduler=constant" in default
    tuned = train_network_argv("m", "t", "c", "o", DreamBoothRun(prior_loss_weight=3.0, lr_scheduler="cosine"))
    assert "--prior_loss_weight=3.0" in tuned and "--lr_scheduler=cosine" in tuned


def test_the_wider_prior_folder_holds_every_other_shape_and_trains_as_regularisation(toy_files, tmp_path):
    concept = Concept("purple", "triangle")
    write_concept_set(tmp_path / "concept", concept, images=2, repeats=2, reg_per_colour=1, seed=0,
                      other_reg_per_combination=1)  # fmt: skip
    wider = tmp_path / "concept" / "reg" / OTHER_REGULARISATION_FOLDER
    captions = sorted(path.read_text().strip() for path in wider.glob("*.txt"))
    pretraining, _ = combination_split(0)
    assert captions == sorted(f"a {c} {s}" for c, s in pretraining if s != "triangle")
    assert len(list(wider.glob("*.png"))) == len(captions)
    # after every class folder, so kohya's balancing repeats the class images first
    assert all(f"1_{shape}" < OTHER_REGULARISATION_FOLDER for shape in SHAPES)
    run = DreamBoothRun(max_train_steps=1, train_batch_size=2, prior_loss_weight=3.0)
    model_file, tokenizers = toy_files / "toy.safetensors", toy_files / "tokenizers"
    train_network.main(train_network_argv(model_file, tokenizers, tmp_path / "concept", tmp_path / "out", run))
    _, metadata = load_lora_file(tmp_path / "out" / "concept.safetensors")
    assert metadata["ss_num_reg_images"] == str(10 + len(captions)) and metadata["ss_prior_loss_weight"] == "3.0"


def test_a_reused_folder_must_hold_the_set_asked_for(tmp_path):
    concept, out = Concept("purple", "triangle"), tmp_path / "concept"
    write_concept_set(out, concept, images=2, repeats=2, reg_per_colour=1, seed=0, reuse=True)
    written = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    write_concept_set(out, concept, images=2, repeats=2, reg_per_colour=1, seed=0, reuse=True)  # the same set: kept
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == written
    with pytest.raises(ConfigError, match=r"other_reg_per_combination 0 -> 1\): use another --work_dir"):
        write_concept_set(out, concept, 2, 2, 1, seed=0, other_reg_per_combination=1, reuse=True)
    assert not (out / "reg" / OTHER_REGULARISATION_FOLDER).exists()  # nothing added to the old set
    (out / RECIPE_FILE).unlink()  # as an interrupted write leaves it
    with pytest.raises(ConfigError, match=f"holds no {RECIPE_FILE}"):
        write_concept_set(out, concept, images=2, repeats=2, reg_per_colour=1, seed=0, reuse=True)


def test_the_report_scores_concept_and_prior_prompts(toy_files):
    model = load_base(toy_files / "toy.safetensors", toy_files / "tokenizers")
    report = concept_report(model, Concept("purple", "triangle"), samples=4, steps=2)
    assert set(report) == {"concept", "concept_colour", "class_prior", "other_prior"}
    assert all(0.0 <= value <= 1.0 for value in report.values())


def test_report_jobs_sample_every_fifth_other_prompt_or_all_of_them():
    concept = Concept("purple", "triangle")
    pretraining, _ = combination_split(0)
    others = [(c, s) for c, s in pretraining if s != "triangle"]
    known = [c for c, s in pretraining if s == "triangle"]
    bench = report_jobs(concept, 0, concept_samples=16, class_samples=4, other_samples=4)
    assert bench["concept"] == [("a sks triangle", "purple", "triangle")] * 16
    assert [(c, s) for _, c, s in bench["class_prior"]] == [(c, "triangle") for c in known for _ in range(4)]
    assert [(c, s) for _, c, s in bench["other_prior"][::4]] == others[::5] and len(bench["other_prior"]) == 40
    wide = report_jobs(concept, 0, concept_samples=32, class_samples=8, other_samples=4, all_other_prompts=True)
    assert len(wide["concept"]) == 32 and len(wide["class_prior"]) == 8 * len(known) == 80
    assert [(c, s) for _, c, s in wide["other_prior"][::4]] == others and len(wide["other_prior"]) == 200
    assert all(prompt == f"a {c} {s}" for jobs in (wide["class_prior"], wide["other_prior"]) for prompt, c, s in jobs)


def test_load_base_casts_an_fp16_file_to_float32_without_diffusers_warnings(tmp_path, monkeypatch):
    import torch
    from diffusers.models import modeling_utils

    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(tmp_path / "tokenizers"))
    save_ldm_checkpoint(build_toy_model(tokenizer, seed=0), tmp_path / "toy16.safetensors", torch.float16)
    warned = []
    monkeypatch.setattr(modeling_utils.logger, "warning", lambda message, *a, **k: warned.append(message))
    model = load_base(tmp_path / "toy16.safetensors", tmp_path / "tokenizers")
    for module in (model.text_encoder, model.vae, model.unet):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert warned == []  # ModelMixin.to(dtype) warns on every call; .float() does not
