"""Import stub: kohya's LoRA tools import torchvision but never call it."""

from . import transforms  # noqa: F401
