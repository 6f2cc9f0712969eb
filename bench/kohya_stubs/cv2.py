"""Import stub: kohya's LoRA tools import cv2 but never call it."""

INTER_LANCZOS4 = 4
INTER_NEAREST_EXACT = 6
INTER_LINEAR = 1
INTER_CUBIC = 2
INTER_AREA = 3
INTER_NEAREST = 0
COLOR_BGRA2RGBA = 5
COLOR_BGR2RGB = 4
COLOR_RGBA2BGRA = 5
COLOR_RGB2BGR = 4
COLOR_BGR2HSV = 40
COLOR_HSV2BGR = 54


def __getattr__(name):
    raise AttributeError(f"cv2 stub: {name} not available")
