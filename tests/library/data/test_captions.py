"""kohya's caption processing, one option at a time, and caption files."""

from collections import Counter

import numpy as np
import pytest

from library.data.captions import CaptionOptions, count_tags, process_caption, read_caption_file
from library.errors import DatasetError

CAPTION = "sks toy, red, cube, on the table, wooden"


def run(caption=CAPTION, epoch=1, seed=0, step=0, max_train_steps=0, **options):
    rng = np.random.default_rng(seed)
    return process_caption(
        caption, CaptionOptions(**options), rng, epoch=epoch, step=step, max_train_steps=max_train_steps
    )


def tags(caption):
    return [t.strip() for t in caption.split(",")]


def test_defaults_leave_the_caption_alone():
    assert run() == CAPTION


def test_prefix_and_suffix_are_joined_with_a_space():
    assert run(caption_prefix="photo,", caption_suffix=", 4k") == "photo, " + CAPTION + " , 4k"


def test_every_caption_line_gets_the_prefix_and_suffix():
    # kohya adds them to the text before choosing a line, so only the first/last line had them
    results = {
        run("one\ntwo", enable_wildcard=True, caption_prefix="p", caption_suffix="s", seed=s) for s in range(20)
    }
    assert results == {"p one s", "p two s"}


def test_only_the_first_line_is_used_without_wildcards():
    assert run("first line\nsecond line") == "first line"


def test_shuffle_keeps_the_first_keep_tokens_tags_and_all_others():
    results = {run(shuffle_caption=True, keep_tokens=2, seed=seed) for seed in range(30)}
    assert len(results) > 1
    for result in results:
        assert tags(result)[:2] == ["sks toy", "red"]
        assert Counter(tags(result)) == Counter(tags(CAPTION))


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix():
    caption = "1girl, miku ||| stage, microphone, smile ||| best quality, general"
    for seed in range(10):
        result = tags(run(caption, keep_tokens_separator="|||", shuffle_caption=True, seed=seed))
        assert result[:2] == ["1girl", "miku"] and result[-2:] == ["best quality", "general"]
        assert sorted(result[2:-2]) == ["microphone", "smile", "stage"]


def test_tag_dropout_drops_only_flexible_tags():
    results = [tags(run(caption_tag_dropout_rate=0.5, keep_tokens=1, seed=seed)) for seed in range(40)]
    assert all(result[0] == "sks toy" for result in results)
    lengths = {len(result) for result in results}
    assert min(lengths) < 5 and max(lengths) <= 5
    # each flexible tag survives about half the time
    kept = Counter(tag for result in results for tag in result[1:])
    assert all(8 <= kept[tag] <= 32 for tag in ["red", "cube", "on the table", "wooden"])


def test_rejoining_uses_comma_space_and_secondary_separator_becomes_the_separator():
    caption = "a,b;;;c,d"
    assert run(caption, secondary_separator=";;;") == "a,b,c,d"  # not re-joined: no shuffle/dropout/warmup
    result = run(caption, secondary_separator=";;;", shuffle_caption=True, keep_tokens=4)
    assert result == "a, b,c, d"


def test_caption_dropout_rate_empties_whole_captions():
    results = [run(caption_dropout_rate=0.3, seed=seed) for seed in range(200)]
    dropped = results.count("")
    assert 35 <= dropped <= 85
    assert set(results) == {"", CAPTION}


def test_dropout_every_n_epochs_uses_epochs_counted_from_one():
    assert [run(caption_dropout_every_n_epochs=3, epoch=epoch) for epoch in (1, 2, 3, 6)] == [CAPTION, CAPTION, "", ""]


def test_wildcards_choose_one_option_and_one_line():
    caption = "{red|blue} cube, {{literal}}\nsecond {a|b}"
    results = {run(caption, enable_wildcard=True, seed=seed) for seed in range(40)}
    assert results == {"red cube, {literal}", "blue cube, {literal}", "second a", "second b"}


def test_token_warmup_grows_the_number_of_flexible_tags():
    # kohya: n = floor(step * (flexible - min) / warmup_steps) + min, with the kept tags in front.
    options = dict(token_warmup_min=1, token_warmup_step=8, keep_tokens=1)
    counts = [len(tags(run(step=step, **options))) for step in (0, 4, 7, 8)]
    assert counts == [1 + 1, 1 + 1 + 1, 1 + 1 + 2, 5]


def test_token_warmup_as_a_fraction_of_the_run():
    options = dict(token_warmup_min=1, token_warmup_step=0.5, max_train_steps=16)  # 8 steps
    assert len(tags(run(step=4, **options))) == 1 + 2  # floor(4 * 4 / 8) + 1


def test_read_caption_file(tmp_path):
    image = tmp_path / "cat_1_2_3_4.png"
    (tmp_path / "cat_1_2_3_4.txt").write_text("a cat, sitting\nsecond line\n\n", encoding="utf-8")
    assert read_caption_file(image, ".txt", enable_wildcard=False) == "a cat, sitting"
    assert read_caption_file(image, ".txt", enable_wildcard=True) == "a cat, sitting\nsecond line"
    assert read_caption_file(image, ".caption", enable_wildcard=False) is None


def test_face_crop_names_fall_back_to_the_plain_caption(tmp_path):
    (tmp_path / "cat.txt").write_text("plain", encoding="utf-8")
    assert read_caption_file(tmp_path / "cat_10_20_30_40.png", ".txt", enable_wildcard=False) == "plain"


@pytest.mark.parametrize(("content", "message"), [(b"", "caption file is empty"), (b"\xff\xfe\x00", "not UTF-8")])
def test_bad_caption_files_name_the_file(tmp_path, content, message):
    (tmp_path / "cat.txt").write_bytes(content)
    with pytest.raises(DatasetError, match=f"{message}.*cat.txt"):
        read_caption_file(tmp_path / "cat.png", ".txt", enable_wildcard=False)


def test_tag_frequency_counts_lower_cased_stripped_tags():
    assert count_tags(["Sks toy, red", "sks toy,  blue ,", ""]) == {"sks toy": 2, "red": 1, "blue": 1}
