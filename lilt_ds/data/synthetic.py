"""A made-up batch of the config's shapes, as the training loader yields it: for measuring memory
and time where real images would only add their decoding."""

from __future__ import annotations

import torch


def random_batch(
    cfg,
    batch: int,
    *,
    vocab: int = 30522,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: int | None = None,
    length: int | None = None,
) -> dict:
    """``{"images", "input_ids", "attention_mask"}``: normal images at ``cfg.model.image_size``, token ids
    past the special tokens of a BERT vocabulary of ``vocab``, a full mask of the training length
    (``length``: a text tower's fixed context length instead, as a pair's OpenCLIP tower has)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    size, length = cfg.model.image_size, length or cfg.data.max_length
    images = torch.randn(batch, 3, size, size, generator=generator)
    input_ids = torch.randint(min(1000, vocab // 2), vocab, (batch, length), generator=generator)
    return {
        "images": images.to(device, dtype),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
    }
