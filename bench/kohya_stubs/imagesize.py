"""Import stub: kohya's LoRA tools import imagesize but never call it."""


def get(path):
    raise RuntimeError("imagesize stub: not available")
