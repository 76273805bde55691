"""The locked-tower feature cache (``data.cache_locked_features``): the pooled output of an image
tower that trains nothing, computed once per image and view, so later epochs neither decode those
images nor run that tower.

A fully locked tower in eval mode is a pure function of its input, so its output for a view of an
image is a constant of the run. ``data.cache_views: K`` views are cached: view v of entry i is the
training augmentation as epoch v draws it (the same pixels an uncached epoch v sees), and epoch e
reads view e mod K; with K = 1 the one view is the evaluation preprocessing (a resize), since a
single augmented view repeated every epoch would only fix one random crop. The features are
computed in the engine's precision (as an uncached run computes them) and stored in fp32 in a
FeatureFile beside the caption file (where ``data.index_cache`` puts the caption index), named
after the caption files, the image root and K, and checked against what computed them: the tower
(its weights, structure and config), the precision, the transform, the seed and the caption
files; a difference restarts it, with a warning that says what changed. The ranks build
it together, each its share of blocks of one batch; a killed build resumes at its first missing
block.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..distributed import all_gather_objects, barrier, world_info
from ..errors import ConfigError
from ..runtime import local_rank
from .caption_dataset import UnreadableEntry, transformed_entry, unreadable_message
from .config import local_ranks
from .errors import DataError
from .index.cache import cache_paths, fingerprint_difference, source_fingerprint
from .index.feature_file import EMPTY, FeatureFile, locked, read_meta, start_feature_file
from .preprocessing.transforms import build_eval_transform

logger = logging.getLogger("lilt_ds.data")

FORMAT = 1


class _Views(Dataset):
    """``(view, entry)`` -> (view, entry, pixels or None, the BadSample when it cannot be read or None)."""

    def __init__(self, table, missing: np.ndarray, transforms: list, seed: int):
        self.table, self.missing, self.transforms, self.seed = table, missing, transforms, seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key):
        view, entry = key
        if self.missing[entry]:
            return view, entry, None, self.table.bad_sample(entry, "file not found")
        try:
            return (
                view,
                entry,
                transformed_entry(self.table, entry, self.transforms[view], self.seed, view, entry),
                None,
            )
        except UnreadableEntry as err:
            return view, entry, None, err.bad


def _collate(samples):
    pixels = [s[2] for s in samples if s[2] is not None]
    return {
        "view": samples[0][0],
        "entries": np.array([s[1] for s in samples], dtype=np.int64),
        "bad": np.array([s[2] is None for s in samples], dtype=bool),
        "bad_samples": [s[3] for s in samples if s[3] is not None],
        "pixels": torch.stack(pixels) if pixels else None,
    }


def tower_digest(tower: torch.nn.Module, config: dict[str, Any]) -> str:
    """What identifies a tower's function: its config, its structure and every weight and buffer."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(repr(tower).encode())
    for name, tensor in tower.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_location(sources: list[str], image_root, views: int, index_cache: str) -> str:
    """The cache's folder, named after what addresses its rows, where ``data.index_cache`` puts the
    caption index: with ``auto`` beside the first caption file when that folder is writable, else in
    the lilt_ds cache folder."""
    candidates = cache_paths(sources, {"image_root": image_root, "views": views}, index_cache, "features")
    return next((path for path in candidates[:-1] if os.access(os.path.dirname(path), os.W_OK)), candidates[-1])


def view_transforms(dataset, views: int, image_size: int, mean, std) -> list:
    """The transform of each cached view: the evaluation resize for one view, else the training one
    (normalised in the worker: the tower runs on the features' build batches directly)."""
    return [build_eval_transform(image_size, mean, std)] if views == 1 else [dataset.transform.with_normalize()] * views


def cache_locked_features(
    dataset,
    model,
    data_cfg,
    tower_config: dict[str, Any],
    device,
    dtype: torch.dtype,
    batch_size: int,
    num_workers: int,
) -> dict[str, Any]:
    """Build (or find) the feature cache of ``model``'s locked image tower over ``dataset`` (a
    CaptionDataset) and make the dataset serve cached features. ``tower_config``: what names the
    tower (part of its identity); ``dtype``: the precision the tower runs in (the engine's; rows are
    stored in fp32 either way); ``batch_size``: images per forward pass and per
    block of the build. Every rank of the process group calls it; returns what this rank did: ``{"folder", "built",
    "blocks", "seconds"}``."""
    if "vision" not in model.fully_locked:
        raise ConfigError(
            "data.cache_locked_features=true, but the image tower trains parameters: "
            "use mode=lit, or mode=lilt with model.vision.unlock=[]"
        )
    vision, views = model.vision, data_cfg.cache_views
    transforms = view_transforms(dataset, views, vision.image_size, vision.mean, vision.std)
    table = dataset.table
    folder = cache_location(table.sources, data_cfg.image_root, views, data_cfg.index_cache)
    meta = {
        "format": FORMAT,
        "views": views,
        "entries": len(table),
        "width": int(vision.width),
        "transforms": [repr(t) for t in transforms],
        "seed": dataset.seed if views > 1 else None,
        "tower": tower_digest(vision, tower_config),
        "dtype": str(dtype).replace("torch.", ""),
        "sources": source_fingerprint(table.sources),
    }
    start = time.perf_counter()
    with locked(folder):
        _restart_if_stale(folder, meta)
    barrier()
    cache = FeatureFile(folder, writable=True)
    encode = _encoder(vision, device, dtype)
    images = _Views(table, dataset._missing, transforms, dataset.seed)
    policy = dataset.on_bad_sample
    built = blocks = 0
    # every rank its share of the blocks; then, where the ranks do not share a file system, the ranks of
    # each machine fill what the others wrote elsewhere
    for share in (world_info(), (local_rank() % local_ranks(), local_ranks())):
        todo = _missing_blocks(cache, batch_size, *share)
        error = _build(cache, todo, images, encode, num_workers, policy) if todo else None
        built += sum(len(b[1]) for b in todo)
        blocks += len(todo)
        _raise_first(all_gather_objects(error))
    if not cache.complete():
        raise DataError(
            f"the feature cache {folder} is incomplete after every rank built its share: "
            "another run may be restarting it (two runs with different towers on one cache?)"
        )
    dataset.use_features(FeatureFile(folder))
    seconds = time.perf_counter() - start
    if built:
        logger.info(
            "feature cache %s: %d of its %d rows built here in %.1f s", folder, built, views * len(table), seconds
        )
    else:
        logger.info("feature cache %s: complete, %d views x %d images", folder, views, len(table))
    return {"folder": folder, "built": built, "blocks": blocks, "seconds": seconds}


def _restart_if_stale(folder: str, meta: dict[str, Any]) -> None:
    found = read_meta(folder)
    if found is None:
        start_feature_file(folder, meta)
        return
    difference = _difference(found, meta)
    if difference is not None:
        logger.warning("%s: %s; rebuilding the feature cache.", folder, difference)
        start_feature_file(folder, meta)


def _difference(found: dict[str, Any], meta: dict[str, Any]) -> str | None:
    if found.get("tower") != meta["tower"]:
        return "built by another image tower (its weights, structure or config differ)"
    if found.get("transforms") != meta["transforms"]:
        return "built with other image preprocessing"
    sources = fingerprint_difference(found.get("sources", []), meta["sources"])
    if sources is not None:
        return f"built from other caption files ({sources})"
    for key in ("format", "dtype", "views", "entries", "width", "seed"):
        if found.get(key) != meta[key]:
            return f"built with {key} {found.get(key)!r}, this run has {meta[key]!r}"
    return None


def _missing_blocks(cache: FeatureFile, block: int, part: int, parts: int):
    """This part's blocks of ``block`` consecutive entries of one view that are not all written."""
    views, entries = cache.status.shape
    per_view = -(-entries // block)
    todo = []
    for number in range(views * per_view):
        if number % parts != part:
            continue
        view, first = divmod(number, per_view)
        rows = np.arange(first * block, min(entries, (first + 1) * block))
        if (cache.status[view, rows] == EMPTY).any():
            todo.append((view, rows))
    return todo


def _build(cache: FeatureFile, todo, images: _Views, encode, num_workers: int, policy: str) -> str | None:
    """Write the rows of the blocks in ``todo``; returns the first bad image under
    on_bad_sample=error (the ranks then stop together), else None."""
    batches = [[(view, int(i)) for i in rows] for view, rows in todo]
    loader = DataLoader(images, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate)
    total, done, last_log = sum(len(b) for b in batches), 0, time.perf_counter()
    for batch in loader:
        if batch["bad_samples"] and policy == "error":
            return unreadable_message(batch["bad_samples"][0])
        rows = encode(batch["pixels"]) if batch["pixels"] is not None else None
        cache.write(batch["view"], batch["entries"], rows, batch["bad"])
        done += len(batch["entries"])
        if time.perf_counter() - last_log > 60:
            logger.info("feature cache: %d of %d rows of this rank written", done, total)
            last_log = time.perf_counter()
    return None


def _encoder(vision: torch.nn.Module, device, dtype: torch.dtype):
    """The tower as the engine will run it: on ``device`` in ``dtype`` (a copy when that is not fp32,
    so the model itself is left for DeepSpeed to cast), eval mode, no grad."""
    tower = vision.to(device) if dtype == torch.float32 else copy.deepcopy(vision).to(device, dtype)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> np.ndarray:
        training = tower.training
        tower.eval()
        try:
            return tower(pixels.to(device, dtype)).float().cpu().numpy()
        finally:
            tower.train(training)

    return encode


def _raise_first(errors: list) -> None:
    for error in errors:
        if error is not None:
            raise DataError(error)
