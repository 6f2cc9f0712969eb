"""Stand-in for torchvision in kohya's environments (PyPI's torchvision does not load beside torch 2.13 CPU).

Only the three transforms kohya's training calls work (see ``transforms``); everything else is absent.
"""

from . import transforms  # noqa: F401
