"""Teachers for the distillation tests: the tiny SD1/SD2 UNets, loaded once and never modified."""

import pytest
import torch

from library.models import load_stable_diffusion


@pytest.fixture(scope="session")
def sd1_teacher(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir).unet


@pytest.fixture(scope="session")
def sd2_teacher(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd2_dir).unet


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny UNets spend more time synchronising threads than computing; on a shared CPU one thread
    # is several times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
