"""Shared code behind the suite's scripts: model I/O, datasets, configs, the training loop."""

import logging

# bitsandbytes (imported by every diffusers import, so before any script configures logging) warns
# on each CPU start that the optional `kernels` package is missing; only this module logs that.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
