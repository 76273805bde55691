"""Randomness of one sample derived from (seed, epoch, index), never from process state.

The caption drawn from a list, the augmentation and the replacement of a bad sample then depend
only on which sample is drawn, not on the number of DataLoader workers or on how far the run had
got before it was resumed: a resumed epoch replays exactly.
"""

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import get_worker_info

from .preprocessing.images import load_rgb

# Stream tags keep the draws for different purposes independent of each other.
CAPTION_STREAM = 1
AUGMENT_STREAM = 2
REPLACE_STREAM = 3


def sample_rng(seed: int, epoch: int, index: int, stream: int, *extra: int) -> np.random.Generator:
    """A generator seeded from the sample's identity and the purpose of the draw."""
    return np.random.default_rng([k % 2**64 for k in (seed, epoch, index, stream, *extra)])


def caption_choice(seed: int, epoch: int, index: int, count: int) -> int:
    """Which of a sample's `count` captions epoch `epoch` trains on."""
    return 0 if count == 1 else int(sample_rng(seed, epoch, index, CAPTION_STREAM).integers(count))


def augmented(transform, image, seed: int, epoch: int, index: int, served: int):
    """`transform(image)` with the random draws of sample `index` (served by entry `served`). An opened
    image is decoded first unless the transform decodes it itself (TrainTransform, at a reduced scale);
    UndecodableImage when it does not decode."""
    if not getattr(transform, "decodes", False):
        image = load_rgb(image)
    with seeded_global_rngs(sample_rng(seed, epoch, index, AUGMENT_STREAM, served)):
        return transform(image)


@contextmanager
def seeded_global_rngs(rng: np.random.Generator):
    """Seed `random`, `numpy.random` and torch's CPU generator from `rng` for the duration of the
    block (torchvision and timm transforms draw from these). In the training process (num_workers=0)
    they are restored after it, so the caller keeps its own random streams; a DataLoader worker's
    belong to no one else, and saving numpy's state costs more than a sample's crop."""
    seeds = rng.integers(0, 2**32, size=3)
    if get_worker_info() is not None:
        _seed(seeds)
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        _seed(seeds)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed(seeds: np.ndarray) -> None:
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    # The CPU generator only: torch.manual_seed also queues a CUDA seeding, with a formatted
    # stack trace, on every call (a millisecond per sample where CUDA is not initialised).
    torch.default_generator.manual_seed(int(seeds[2]))
