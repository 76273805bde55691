"""The pretraining dataset: image-caption pairs from a validated CaptionTable.

Items are addressed by `(epoch, index)` pairs, which is what `ResumableDistributedSampler`
yields: DataLoader workers (persistent ones especially) hold their own copy of the dataset, so
the epoch has to travel with the index for the caption draw and the augmentation to follow it.
A plain `index` means epoch 0.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from .bad_samples import SKIP_FIX, BadSample, BadSampleLog, check_bad_sample_policy
from .errors import DataError, format_list
from .index.captions import CaptionTable
from .index.feature_file import BAD
from .index.image_store import is_stored, stored_image
from .preprocessing.images import UndecodableImage, open_image
from .sample_rng import REPLACE_STREAM, augmented, caption_choice, sample_rng

MAX_REPLACEMENT_DRAWS = 50


class CaptionDataset(Dataset):
    """`dataset[(epoch, index)]` -> `{"image": FloatTensor[3,H,W], "caption": str, "index": int,
    "bad_samples": [BadSample, ...]}`; after `use_features`, `"image_features": FloatTensor[D]`
    (the locked image tower's output, cached) in place of `"image"`.

    `index` is the entry actually served (a replacement under on_bad_sample=skip) and
    `bad_samples` lists the bad entries it replaced; `TrainLoader` records them in
    `self.bad_samples` (a BadSampleLog) in the main process. Every file is checked for existence
    once here; decoding failures surface when an item is read.
    """

    def __init__(
        self,
        table: CaptionTable,
        transform,
        seed: int = 0,
        on_bad_sample: str = "error",
        max_bad_fraction: float = 0.01,
        check_files: bool = True,
    ):
        check_bad_sample_policy(on_bad_sample, max_bad_fraction)
        self.table = table
        self.transform = transform
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.bad_samples = BadSampleLog(len(table), max_bad_fraction)
        missing = table.missing_images() if check_files else []
        self._missing = np.zeros(len(table), dtype=bool)
        self._missing[[s.index for s in missing]] = True
        if missing and on_bad_sample == "error":
            raise DataError(
                f"{len(missing)} of {len(table)} images are missing:\n"
                f"{format_list([s.describe() for s in missing])}\n"
                "Fix the paths (data.image_root can rewrite a prefix), " + SKIP_FIX + "."
            )
        self.bad_samples.record_missing(missing)
        self.features = None

    def __len__(self) -> int:
        return len(self.table)

    def use_features(self, features) -> None:
        """Serve `features` (a complete FeatureFile of K views per entry) in place of decoded
        images: items then carry `"image_features"` (epoch e: view e mod K) and no `"image"`."""
        self.features = features

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        replaced: list[BadSample] = []
        for draw in range(MAX_REPLACEMENT_DRAWS + 1):
            served = index if draw == 0 else self._replacement(epoch, index, draw)
            if self._missing[served]:
                replaced.append(self.table.bad_sample(served, "file not found"))
                continue
            try:
                name, value = self._read(epoch, index, served)
            except UnreadableEntry as err:
                if self.on_bad_sample == "error":
                    raise DataError(unreadable_message(err.bad)) from err.__cause__
                replaced.append(err.bad)
                continue
            return {name: value, "caption": self.caption(epoch, served), "index": served, "bad_samples": replaced}
        raise DataError(
            f"on_bad_sample=skip drew {MAX_REPLACEMENT_DRAWS} replacements for entry "
            f"{index} and every one was bad, e.g. {replaced[-1].describe()}. Most of "
            "the images cannot be read: check the files and data.image_root."
        )

    def _read(self, epoch: int, index: int, served: int) -> tuple[str, torch.Tensor]:
        """("image", pixels) decoded and augmented, or ("image_features", row) from the cache."""
        if self.features is not None:
            view = epoch % self.features.shape[0]
            if self.features.status[view, served] == BAD:
                raise UnreadableEntry(
                    self.table.bad_sample(
                        served, f"cannot decode (found when the feature cache {self.features.folder} was built)"
                    )
                )
            return "image_features", torch.from_numpy(np.array(self.features.features[view, served]))
        return "image", transformed_entry(self.table, served, self.transform, self.seed, epoch, index)

    def caption(self, epoch: int, index: int) -> str:
        """The caption of `index` for `epoch`: drawn from (seed, epoch, index) when the entry has
        several."""
        return self.table.caption(index, caption_choice(self.seed, epoch, index, self.table.num_captions(index)))

    def _replacement(self, epoch: int, index: int, draw: int) -> int:
        return int(sample_rng(self.seed, epoch, index, REPLACE_STREAM, draw).integers(len(self)))


class UnreadableEntry(Exception):
    """An entry that cannot be served: `bad` says which and why."""

    def __init__(self, bad: BadSample):
        super().__init__(bad.describe())
        self.bad = bad


def transformed_entry(table: CaptionTable, index: int, transform, seed: int, epoch: int, sample: int):
    """Entry `index`'s image through `transform` with the random draws of `sample` in `epoch`;
    UnreadableEntry when the file does not open or decode."""
    path = table.image_path(index)
    try:
        with open_image(stored_image(path) if is_stored(path) else path) as image:
            return augmented(transform, image, seed, epoch, sample, index)
    except UndecodableImage as err:
        raise UnreadableEntry(table.bad_sample(index, f"cannot decode: {err}")) from err


def unreadable_message(bad: BadSample) -> str:
    """What stops a run at a bad entry under on_bad_sample=error, and how to go on."""
    return f"{bad.describe()}. Replace or delete the file, {SKIP_FIX}."
