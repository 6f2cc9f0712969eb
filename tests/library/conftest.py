"""Fixtures of the dataset tests: the tiny tokenizer and a writable copy of the tiny dataset."""

import pytest
from transformers import CLIPTokenizer

from tests.library.dataset_helpers import copy_tiny_dataset


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    return CLIPTokenizer.from_pretrained(tiny_sd.sd1_dir, subfolder="tokenizer")


@pytest.fixture
def data(tiny_sd, tmp_path):
    """The tiny dataset's folders (``img``, ``reg``, ``subject``, ...) copied where a test may write."""
    return copy_tiny_dataset(tiny_sd, tmp_path)
