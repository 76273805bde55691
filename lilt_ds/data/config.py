"""The `data` section of the experiment config: what the schema (lilt_ds.schema.DataSettings) cannot
check alone, resolved once when the config loads (`load_config` runs it, with the existence of the
files named), and the loader settings that `auto` leaves to the device."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..schema import DataSettings, as_section
from .errors import DataError
from .index.image_root import ImageRoot
from .index.tables import check_table, table_kind
from .preprocessing.transforms import resolve_augment

AUTO = "auto"
CPU_WORKERS = 2  # data.num_workers=auto on the CPU (the default before "auto" existed)
MAX_GPU_WORKERS = 8  # data.num_workers=auto on a GPU: at most this many per rank


ORIGINAL_TEXT = {"clean_captions": True, "max_length": 25, "eval_max_length": 30}
"""The original LilT's caption handling: what null text keys resolve to unless the model is a pretrained
pair (lilt_ds.config.resolve_text sets a pair's first)."""


def resolve_data_config(data: DataSettings | Mapping[str, Any] | None = None, must_exist: bool = False) -> DataSettings:
    """`data` (typed, or a mapping of its keys as a YAML file gives it) checked, with its augmentation
    resolved from the preset. With `must_exist`, the annotation files and image folders named must
    exist too. Resolving a resolved section changes nothing."""
    data = as_section(DataSettings, data, "data")
    if data.train_shards is not None and data.train_files:
        raise DataError(
            "data.train_files and data.train_shards are both set; train on one of them (set the other to [] / null)."
        )
    if data.resampled and data.train_shards is None:
        raise DataError(
            "data.resampled=true draws tar shards with replacement, and data.train_shards is not set: set the shards, "
            "or data.resampled=false."
        )
    if data.samples_per_epoch is not None and data.train_shards is None:
        raise DataError(
            f"data.samples_per_epoch = {data.samples_per_epoch} counts the samples of data.train_shards, which is "
            "not set: set it to null (a caption JSON counts its own entries)."
        )
    ImageRoot(data.image_root, "data.image_root")
    ImageRoot(data.eval_image_root, "data.eval_image_root")
    data = dataclasses.replace(data, augment=resolve_augment(data.augment))
    data = dataclasses.replace(data, **{k: v for k, v in ORIGINAL_TEXT.items() if getattr(data, k) is None})
    _check_device_decode(data)
    if must_exist:
        _check_paths(data)
    return data


def _check_device_decode(data: DataSettings) -> None:
    """data.decode=device crops and flips on the GPU; the other augmentations run on PIL images."""
    if data.decode != "device":
        return
    aug = data.augment
    cpu_only = {
        "randaugment": aug.randaugment,
        "color_jitter": aug.color_jitter if any(aug.color_jitter) else False,
        "grayscale": aug.grayscale or False,
    }
    on = {key: value for key, value in cpu_only.items() if value}
    if on:
        settings = ", ".join(f"data.augment.{key} = {value!r}" for key, value in on.items())
        raise DataError(
            f"data.decode = device decodes, crops and flips on the GPU only, and {settings} needs the CPU: set "
            "data.decode=cpu, or turn those off (data.augment.preset=openclip crops only)."
        )


def _check_paths(data: DataSettings) -> None:
    """The annotation files and image folders named exist; the shards exist, or their URL schemes have
    a backend, and have sample counts (their counts files are read; no tar is opened)."""
    if data.train_shards is not None:
        from .shards.files import find_shards

        find_shards(data.train_shards, data.samples_per_epoch, timeout_s=data.shard_timeout_s, resampled=data.resampled)
    for i, path in enumerate(data.train_files):
        if not (os.path.isfile(path) or table_kind(path) == "datasets"):
            raise DataError(
                f"data.train_files[{i}] = {path!r} does not exist: check the path "
                "(relative paths start from the folder the command runs in)"
            )
        if table_kind(path):
            check_table(
                path, data.table.image_key, data.table.caption_key, data.table.separator, f"data.train_files[{i}]"
            )
    if data.eval_file is not None and not os.path.isfile(data.eval_file):
        raise DataError(f"data.eval_file = {data.eval_file!r} does not exist: check the path")
    for key in ("image_root", "eval_image_root"):
        root = getattr(data, key)
        folder = root if isinstance(root, str) else (root or {}).get("to")
        if folder and not os.path.isdir(folder):
            raise DataError(f"data.{key} = {root!r}: the folder {folder} does not exist")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which schedulers and launchers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_ranks() -> int:
    """Ranks on this machine, as the launcher says (DeepSpeed: LOCAL_SIZE; torchrun: LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1))


def loader_settings(
    data: DataSettings, device_type: str, cpus: int | None = None, ranks_here: int | None = None
) -> tuple[int, bool]:
    """(num_workers, pin_memory) of one rank's loaders, ``auto`` decided for ``device_type``.

    On a GPU each rank gets the CPUs it shares the machine with, less one for its own process, at
    most MAX_GPU_WORKERS, and pinned memory (asynchronous host-to-device copies). On the CPU the
    step itself needs the cores: CPU_WORKERS workers, nothing pinned.
    """
    workers, pin = data.num_workers, data.pin_memory
    gpu = device_type != "cpu"
    if workers == AUTO:
        share = (cpus or usable_cpus()) // (ranks_here or local_ranks())
        workers = min(MAX_GPU_WORKERS, max(1, share - 1)) if gpu else CPU_WORKERS
    if pin == AUTO:
        pin = gpu
    return workers, pin


def eval_loader_settings(data: DataSettings, device_type: str) -> tuple[int, bool]:
    """(num_workers, pin_memory) of the evaluation image loader: on a GPU those of training; on the
    CPU none (the forward passes need every core, and workers would only compete with them)."""
    return loader_settings(data, device_type) if device_type != "cpu" else (0, False)
