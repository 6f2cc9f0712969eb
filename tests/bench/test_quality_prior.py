"""The prior-preservation calibration: paired errors computed as a textbook would, the bars read as
documented, and a whole (tiny) run that trains each seed, scores each checkpoint on the base's noise."""

import numpy as np
import pytest

from bench.quality_prior import main, meets_bars, paired_change
from library.models.stable_diffusion import save_ldm_checkpoint
from networks.lora_file import load_lora_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_paired_change_is_the_mean_difference_and_its_standard_error():
    rng = np.random.default_rng(0)
    before = rng.random(200) < 0.88
    after = np.where(rng.random(200) < 0.1, ~before, before)  # a few samples flip either way
    change, error = paired_change(list(after), list(before))
    differences = after.astype(float) - before.astype(float)
    assert change == pytest.approx(after.mean() - before.mean())
    assert error == pytest.approx(differences.std(ddof=1) / np.sqrt(200))
    assert paired_change([True] * 5, [True] * 5) == (0.0, 0.0)  # the same readings: no error at all
    with pytest.raises(ValueError, match="equal length"):
        paired_change([True, False], [True])


def test_the_bars_are_the_concept_rate_and_the_largest_prior_drop():
    base = {"concept": [False] * 10, "class_prior": [True] * 8 + [False] * 12, "other_prior": [True] * 20}
    good = {"concept": [True] * 8 + [False] * 2, "class_prior": [True] * 20, "other_prior": [True] * 19 + [False]}
    assert meets_bars(good, base, concept_bar=0.8, points=5)  # other -5 points: at the bar, not below
    assert not meets_bars(good | {"concept": [True] * 7 + [False] * 3}, base, 0.8, 5)
    assert not meets_bars(good | {"other_prior": [True] * 18 + [False] * 2}, base, 0.8, 5)  # -10 points
    assert not meets_bars(good | {"class_prior": [True] * 6 + [False] * 14}, base, 0.8, 5)  # class -10 points


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    from library.toy_world.model import build_toy_model, tokenizer_cache_folder, write_toy_tokenizer

    root = tmp_path_factory.mktemp("toy_prior")
    tokenizer = write_toy_tokenizer(tokenizer_cache_folder(root / "tokenizers"))
    save_ldm_checkpoint(build_toy_model(tokenizer, seed=0), root / "toy.safetensors")
    return root


def test_a_run_trains_each_seed_and_scores_each_checkpoint_on_the_bases_samples(
    toy_files, tmp_path, capsys, monkeypatch
):
    argv = [
        "--model", str(toy_files / "toy.safetensors"), "--tokenizers", str(toy_files / "tokenizers"),
        "--work_dir", str(tmp_path), "--train_seeds", "0", "1", "--steps", "2", "--score_steps", "1", "2",
        "--images", "2", "--repeats", "1", "--reg_per_colour", "1", "--batch", "2", "--concept_samples", "2",
        "--class_samples", "1", "--other_samples", "1", "--sample_steps", "2", "--jobs", "1",
    ]  # fmt: skip
    results = main(argv)
    assert set(results) == {None, 0, 1}
    sizes = {"concept": 2, "class_prior": 10, "other_prior": 50}  # 10 known colours, 50 other prompts
    assert {name: len(hits) for name, hits in results[None].hits[0].items()} == sizes
    for seed in (0, 1):
        assert set(results[seed].hits) == {1, 2}
        assert all({n: len(h) for n, h in results[seed].hits[step].items()} == sizes for step in (1, 2))
    # the other-shape prior folder is written (default 1 per combination) and trained on
    _, metadata = load_lora_file(tmp_path / "seed0" / "concept.safetensors")
    assert metadata["ss_num_reg_images"] == str(10 + 50) and metadata["ss_prior_loss_weight"] == "4.0"
    # kohya's --seed differs between the runs, the concept set does not
    first, _ = load_lora_file(tmp_path / "seed0" / "concept.safetensors")
    second, _ = load_lora_file(tmp_path / "seed1" / "concept.safetensors")
    assert any(not np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| train seed")]
    assert [r.split(" | ")[:2] for r in rows] == [["| base model", "-"], ["| 0", "1"], ["| 0", "2"], ["| 1", "1"],
                                                  ["| 1", "2"]]  # fmt: skip
    assert "step 2: all bars met at" in table

    # --reuse scores the same files again without training: the same verdicts, sample by sample
    import train_network

    monkeypatch.setattr(train_network, "main", lambda argv: pytest.fail("--reuse trained again"))
    again = main([*argv, "--reuse", "--train_seeds", "1"])
    assert again[1].hits == results[1].hits and again[1].train_cpu_seconds == 0.0
    assert "training CPU s per run: reused" in capsys.readouterr().out


def test_a_score_step_past_the_run_is_refused_before_anything_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path / "missing"), "--tokenizers", str(tmp_path), "--steps", "100",
              "--score_steps", "50", "150"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--score_steps 150" in capsys.readouterr().err
