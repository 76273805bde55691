"""Image files: which kinds lilt_ds reads, decoding to RGB (at a reduced scale where the format allows),
and the one-time existence check over a whole dataset."""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..index.image_store import exists, is_stored

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""The image files lilt_ds reads (common kinds PIL decodes); tar shards hold the first four."""
SHARD_IMAGE_KEYS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS[:4])
"""The image keys of a tar shard sample (WebDataset names them by extension): jpg, jpeg, png, webp."""

# Existence checks are latency-bound on network file systems; threads overlap the round trips.
_CHECK_THREADS = 16


REDUCTIONS = (8, 4, 2)
"""The scales JPEG decoders can decode at directly (1/8, 1/4, 1/2: libjpeg's DCT scaling, PIL's `draft`)."""


class UndecodableImage(Exception):
    """An image file whose header reads but whose pixels do not decode (truncated, corrupt)."""


def open_image(source) -> Image.Image:
    """Open an image file or file object, reading its header only (format and size): the pixels decode
    in load_rgb. UndecodableImage when it is not an image PIL reads."""
    try:
        return Image.open(source)
    except Exception as err:  # noqa: BLE001 - whatever the opener raises, the file is bad data
        raise UndecodableImage(f"{type(err).__name__}: {err}") from err


def open_rgb(path) -> Image.Image:
    """Decode an image file fully (so truncation errors surface here) and convert it to RGB."""
    with open_image(path) as image:
        return load_rgb(image)


def largest_reduction(crop_width: float, crop_height: float, size: int) -> int:
    """The largest JPEG decode scale 1/r (r in 1, 2, 4, 8) that leaves a crop of this size at least twice
    ``size`` on both sides: the final resize still shrinks by 2 or more, so the DCT scaling's filter
    hardly shows (closer, it costs detailed photos 10 dB of PSNR; the decode saved is small there)."""
    return next((r for r in REDUCTIONS if min(crop_width, crop_height) / r >= 2 * size), 1)


def encoded_bytes(image: Image.Image) -> torch.Tensor:
    """The whole file of an opened (not yet decoded) image, as uint8 [N]: what torchvision's decoders take."""
    image.fp.seek(0)
    return torch.frombuffer(bytearray(image.fp.read()), dtype=torch.uint8)


def decode_jpeg_rgb(image: Image.Image) -> torch.Tensor:
    """An opened JPEG's pixels as uint8 [3, H, W], decoded by torchvision straight into the tensor (the
    same libjpeg-turbo as PIL, the same pixels, without PIL's copies into an array). UndecodableImage
    when they do not decode."""
    try:
        return decode_jpeg(encoded_bytes(image), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        # torchvision's messages start with the function and its C++ source line: keep what follows them
        raise UndecodableImage(f"JPEG decoding: {str(err).split(', ', 2)[-1].strip()}") from err


def load_rgb(image: Image.Image, reduction: int = 1) -> Image.Image:
    """The RGB pixels of an opened (not yet decoded) image; with ``reduction`` r > 1 a JPEG decodes at
    1/r of its size (DCT scaling: a fraction of the work of a full decode), other formats in full.
    UndecodableImage when the pixels do not decode."""
    try:
        if reduction > 1:
            image.draft("RGB", (image.width // reduction, image.height // reduction))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises, the file is bad data
        raise UndecodableImage(f"{type(err).__name__}: {err}") from err


def find_missing_files(paths: Sequence[str]) -> np.ndarray:
    """Boolean mask: True where `paths[i]` is not an existing regular file."""
    if len(paths) == 0:
        return np.zeros(0, dtype=bool)
    bounds = np.linspace(0, len(paths), _CHECK_THREADS * 4 + 1, dtype=np.int64)
    chunks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def missing_in(chunk):
        return [not (exists(paths[i]) if is_stored(paths[i]) else os.path.isfile(paths[i])) for i in range(*chunk)]

    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        return np.array([m for part in pool.map(missing_in, chunks) for m in part], dtype=bool)
