"""Import stub: placeholders that fail if actually used."""

import enum


class _Unavailable:
    def __init__(self, *args, **kwargs):
        self.args = args

    def __call__(self, *args, **kwargs):
        raise RuntimeError("torchvision stub: not available")


class Compose(_Unavailable):
    pass


class ToTensor(_Unavailable):
    pass


class Normalize(_Unavailable):
    pass


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


from . import functional  # noqa: E402,F401
