"""Batching image-caption samples: images stacked, captions tokenized and padded to the longest."""

import numpy as np
import torch

from .device_decode import split_encoded
from .text import check_tokenizer, tokenize_captions


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack through numpy: single-threaded, see transforms.ToNormalizedTensor."""
    return torch.from_numpy(np.stack([image.numpy() for image in images]))


class ImageTextCollator:
    """`collate(samples)` -> `{"images": uint8 [B,3,H,W], "input_ids": LongTensor[B,L],
    "attention_mask": LongTensor[B,L], "index": LongTensor[B], "bad_samples": [BadSample, ...]}`,
    with `"image_features": FloatTensor[B,D]` in place of `"images"` when the samples carry them, and
    `"encoded_images"` (device_decode.split_encoded) where data.decode=device left JPEGs encoded.

    Tokenizing here, in the DataLoader worker, keeps it off the training process. `bad_samples`
    carries the skipped entries of the batch to the main process (TrainLoader records and removes
    it)."""

    def __init__(self, tokenizer, max_length: int):
        check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict]) -> dict:
        # a cached image tower's features come in place of the images (CaptionDataset.use_features)
        if "image" in samples[0]:
            images, encoded = split_encoded([s["image"] for s in samples])
            batch = {"images": stack_images(images)}
            if encoded is not None:  # data.decode=device: the JPEGs decode in the training process (to_device)
                batch["encoded_images"] = encoded
        else:
            batch = {"image_features": stack_images([s["image_features"] for s in samples])}
        batch.update(tokenize_captions(self.tokenizer, [s["caption"] for s in samples], self.max_length))
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        batch["bad_samples"] = [bad for s in samples for bad in s["bad_samples"]]
        return batch
