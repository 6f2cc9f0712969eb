"""The tiny fixtures' tokenizer keeps every listed word whole, whatever words came before it."""

from library.tiny_parts import VOCAB_WORDS, write_tiny_tokenizer


def test_every_vocabulary_word_is_one_token(tmp_path):
    tokenizer = write_tiny_tokenizer(tmp_path / "tok", v2=False)
    assert [w for w in VOCAB_WORDS if tokenizer.tokenize(w) != [f"{w}</w>"]] == []


def test_later_words_do_not_split_earlier_ones(tmp_path):
    # "red" before "green": a naive left-to-right merge list turns "green" into g, re, e, n.
    words = ["red", "green", "reed", "ring", "triangle"]
    tokenizer = write_tiny_tokenizer(tmp_path / "tok", v2=False, words=words)
    assert [tokenizer.tokenize(w) for w in words] == [[f"{w}</w>"] for w in words]
