"""The text conditioning of a training batch, with kohya's ``--weighted_captions``.

Unweighted captions were tokenised when the batch was made (``input_ids``); weighted ones are
tokenised here from the batch's processed captions, as kohya does in its training step, so that
caption shuffling and dropout act on the text before its ``(word:1.2)`` weights are read.
"""

from __future__ import annotations

import argparse

import torch

from library.models.prompt_weighting import apply_token_weights, tokenize_with_weights
from library.models.stable_diffusion import StableDiffusionModel


def caption_hidden_states(model: StableDiffusionModel, batch: dict, args: argparse.Namespace) -> torch.Tensor:
    """The UNet's text conditioning for the batch's captions (``--clip_skip``, ``--max_token_length``)."""
    if not args.weighted_captions:
        return model.encode_prompt(batch["input_ids"], args.clip_skip)
    ids, weights = tokenize_with_weights(model.tokenizer, batch["captions"], args.max_token_length)
    return apply_token_weights(model.encode_prompt(ids, args.clip_skip), weights)
