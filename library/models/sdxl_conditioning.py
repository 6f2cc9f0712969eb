"""How a caption and an image's sizes become SDXL's UNet conditioning (as kohya and diffusers compute it).

The UNet sees the concatenated penultimate hidden states of CLIP-L and bigG (no final layer norm),
and an ``added_cond_kwargs`` pair: bigG's pooled, projected text and six numbers per image
(original height/width, crop top/left, target height/width) that SDXL embeds like timesteps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library.models.text_encoding import join_chunks


def _penultimate(text_encoder: torch.nn.Module, ids: torch.Tensor):
    batch, chunks, length = ids.shape
    out = text_encoder(ids.reshape(batch * chunks, length).to(text_encoder.device), output_hidden_states=True)
    return join_chunks(out.hidden_states[-2], batch, chunks), out


def encode_sdxl_prompt(
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection,
    input_ids: torch.Tensor,
    input_ids_2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states ``(B, n_chunks*75 + 2, D1 + D2)``, pooled text ``(B, P)``) for ids of both tokenizers.

    ``input_ids``/``input_ids_2`` are ``(B, n_chunks, 77)`` from ``text_encoding.tokenize_captions``.
    With several 75-token chunks the pooled text is the first chunk's, as in kohya.
    """
    hidden_1, _ = _penultimate(text_encoder, input_ids)
    hidden_2, out_2 = _penultimate(text_encoder_2, input_ids_2)
    chunks = input_ids_2.shape[1]
    pooled = out_2.text_embeds.reshape(input_ids_2.shape[0], chunks, -1)[:, 0]
    return torch.cat([hidden_1, hidden_2.to(hidden_1.dtype)], dim=-1), pooled


def size_time_ids(
    original_sizes_hw: Sequence[Sequence[int]],
    crop_top_lefts: Sequence[Sequence[int]],
    target_sizes_hw: Sequence[Sequence[int]],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """SDXL's ``time_ids`` ``(B, 6)``: original (h, w), crop (top, left), target (h, w) per image."""
    rows = [
        [*map(int, original), *map(int, crop), *map(int, target)]
        for original, crop, target in zip(original_sizes_hw, crop_top_lefts, target_sizes_hw, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def sdxl_unet_conditioning(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> dict:
    """Keyword arguments of ``UNet2DConditionModel`` besides sample and timestep."""
    return {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": {"text_embeds": pooled.to(hidden.dtype), "time_ids": time_ids.to(hidden)},
    }
