"""Training: kohya's flags, the accelerate loop and its tasks, and everything a run writes.

``args`` defines and checks kohya's flags, ``config_file`` reads and writes ``--config_file`` tomls;
``loop`` is the one training loop, driven by a task (``network_trainer`` for train_network.py, feature
packages for theirs) through the contract in ``network_protocol``; ``skeleton`` is the order of work
every trainer shares (check, load, place, prepare, run), ``model_setup`` loads and places the model with
kohya's model flags, ``networks`` imports and creates ``--network_module``'s network; ``optimizers`` and
``noise`` build kohya's optimizers, schedulers, noise and the one ``diffusion_loss``; ``saving`` names
and rotates outputs and writes ``ss_*`` metadata; ``sampling`` renders sample images; ``theseus`` swaps
modules progressively. Feature packages (distill, ffn_compression, resize) build on this package, never
the reverse.
"""
