"""Import stub."""


def __getattr__(name):
    raise AttributeError(f"torchvision stub: transforms.functional.{name} not available")
