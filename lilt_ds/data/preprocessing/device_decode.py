"""data.decode=device: a JPEG leaves the DataLoader worker as its bytes with its crop already drawn, and
decodes with the rest of its batch in one nvJPEG call on the GPU, where it is cropped, resized and flipped.
Other formats are decoded and cropped in the worker as usual and share the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from ..errors import DataError


@dataclass(frozen=True)
class EncodedCrop:
    """A training image not decoded yet: the file's bytes, the crop (top, left, height, width) drawn
    from its header size, the flip drawn, and the output's side and resize filter."""

    data: torch.Tensor  # uint8 [N]
    box: tuple[int, int, int, int]
    flip: bool
    size: int
    interpolation: str  # a torchvision InterpolationMode value: bicubic, bilinear, nearest


def split_encoded(images: list) -> tuple[list[torch.Tensor], dict | None]:
    """A batch's images (uint8 [3, S, S] tensors and EncodedCrops) -> (the tensors, black images in the
    encoded slots; what decode_on_device needs of those, or None when there are none)."""
    slots = [i for i, image in enumerate(images) if isinstance(image, EncodedCrop)]
    if not slots:
        return images, None
    first = images[slots[0]]
    black = torch.zeros((3, first.size, first.size), dtype=torch.uint8)
    encoded = {
        "slots": torch.tensor(slots, dtype=torch.long),
        "data": [images[i].data for i in slots],
        "boxes": torch.tensor([images[i].box for i in slots], dtype=torch.long),
        "flips": torch.tensor([images[i].flip for i in slots], dtype=torch.bool),
        "interpolation": first.interpolation,
    }
    return [black if isinstance(image, EncodedCrop) else image for image in images], encoded


def decode_on_device(images: torch.Tensor, encoded: dict, index: torch.Tensor) -> torch.Tensor:
    """Fill the encoded slots of ``images`` (uint8 [B, 3, S, S], on its device) with their decoded,
    cropped, resized and flipped JPEGs: one batched decode on ``images.device``; an image the batched
    decode refuses is decoded alone on the CPU; one that does not decode at all stops the run naming it
    (``index``: the batch's entry numbers)."""
    device, size = images.device, images.shape[-1]
    interpolation = InterpolationMode(encoded["interpolation"])
    try:
        decoded = decode_jpeg(encoded["data"], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_alone(data, int(index[slot])) for data, slot in zip(encoded["data"], encoded["slots"])]
    for slot, pixels, box, flip in zip(encoded["slots"].tolist(), decoded, encoded["boxes"].tolist(), encoded["flips"]):
        top, left, height, width = box
        crop = F2.resized_crop(
            pixels.to(device).float(), top, left, height, width, [size, size], interpolation, antialias=True
        )
        crop = crop.round_().clamp_(0, 255).to(torch.uint8)
        images[slot] = crop.flip(-1) if flip else crop
    return images


def _decode_alone(data: torch.Tensor, entry: int) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise DataError(
            f"training entry {entry}: its JPEG does not decode ({err}); with data.decode=device a bad image stops "
            "the run. Set data.decode=cpu, where data.on_bad_sample=skip can replace it."
        ) from err
