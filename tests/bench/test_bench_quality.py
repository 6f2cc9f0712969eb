"""The base rows of the quality bench: one pair of rows (pretraining, held-out) per guidance scale."""

from types import SimpleNamespace

from bench import bench_quality
from library.toy_world.generator import combination_split


def test_base_rows_score_both_prompt_sets_at_each_guidance(monkeypatch):
    calls = []

    def fake_report(model, combinations, per_combination, seed, **sampling):
        calls.append((len(combinations), per_combination, seed, sampling))
        return SimpleNamespace(rates=lambda: {"colour": 0.5, "shape": 1.0, "both": 0.5})

    monkeypatch.setattr(bench_quality, "sample_report", fake_report)
    rows = bench_quality.base_rows(None, 0, 4, [2.0, 3.0])
    pretraining, held_out = combination_split(0)
    assert calls == [
        (len(pretraining), 4, 0, {"guidance": 2.0}),
        (len(held_out), 4, 0, {"guidance": 2.0}),
        (len(pretraining), 4, 0, {"guidance": 3.0}),
        (len(held_out), 4, 0, {"guidance": 3.0}),
    ]
    assert rows[0] == "| base, pretraining prompts, guidance 2 | 0.50 | 1.00 | 0.50 |"
    assert rows[3].startswith("| base, held-out prompts, guidance 3 |")
