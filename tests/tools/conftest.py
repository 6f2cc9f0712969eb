import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_module_fixtures():
    """tests/conftest.py sets one thread per test; module fixtures run the tiny models before that."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
