"""Teachers for the distillation tests: the tiny SD1/SD2 UNets, loaded once and never modified."""

import pytest

from library.models.stable_diffusion import load_stable_diffusion


@pytest.fixture(scope="session")
def sd1_teacher(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd1_dir).unet


@pytest.fixture(scope="session")
def sd2_teacher(tiny_sd):
    return load_stable_diffusion(tiny_sd.sd2_dir).unet
