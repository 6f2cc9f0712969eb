"""Shared code behind the suite's scripts: model I/O, datasets, configs, the training loop."""
