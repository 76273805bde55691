"""Image files: which kinds lilt_ds reads, decoding to RGB, and the one-time existence check over a
whole dataset."""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..index.image_store import exists, is_stored

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""The image files lilt_ds reads (common kinds PIL decodes); tar shards hold the first four."""
SHARD_IMAGE_KEYS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS[:4])
"""The image keys of a tar shard sample (WebDataset names them by extension): jpg, jpeg, png, webp."""

# Existence checks are latency-bound on network file systems; threads overlap the round trips.
_CHECK_THREADS = 16


def open_rgb(path: str) -> Image.Image:
    """Decode an image file fully (so truncation errors surface here) and convert it to RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


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
