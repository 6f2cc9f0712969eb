"""Stand-in: kohya's training never calls ``transforms.functional``; any use raises."""


def __getattr__(name: str):
    raise AttributeError(f"torchvision stand-in: transforms.functional.{name} not available")
