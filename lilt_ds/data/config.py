"""The `data` section of the experiment config: its defaults, and the checks that reject unknown
keys and bad values before anything is loaded (`load_config` runs them, with the existence of the
files named)."""

import copy
import os
from typing import Any, Dict, Optional, Tuple

from ..presets import Config, base_defaults, to_config
from .bad_samples import check_bad_sample_policy
from .errors import DataError
from .index.image_root import ImageRoot
from .preprocessing.transforms import resolve_augment

# the one list of keys and defaults is the experiment schema, lilt_ds/configs/_base.yaml
DATA_DEFAULTS: Dict[str, Any] = base_defaults()["data"]

_POSITIVE_INTS = ("max_words", "max_length", "eval_max_length", "cache_views")
_BOOLS = ("clean_captions", "persistent_workers", "cache_locked_features")
AUTO = "auto"
CPU_WORKERS = 2        # data.num_workers=auto on the CPU (the default before "auto" existed)
MAX_GPU_WORKERS = 8    # data.num_workers=auto on a GPU: at most this many per rank


class DataSettings(Config):
    """A data section that `resolve_data_config` has completed and checked: resolved once, passed on."""


def resolve_data_config(data_cfg: Dict[str, Any] = None, must_exist: bool = False) -> DataSettings:
    """A complete, checked copy of `data_cfg`: missing keys take DATA_DEFAULTS, unknown keys and
    bad values raise DataError naming the key (`data.<key>`) and what it accepts. With `must_exist`,
    the annotation files and image folders named must exist too. Given its own result, returns it."""
    if isinstance(data_cfg, DataSettings) and not must_exist:
        return data_cfg
    data_cfg = dict(data_cfg or {})
    cfg = copy.deepcopy(DATA_DEFAULTS)
    _reject_unknown(data_cfg, DATA_DEFAULTS, "data")
    demo = data_cfg.pop("demo", None) or {}
    _reject_unknown(demo, DATA_DEFAULTS["demo"], "data.demo")
    augment = data_cfg.pop("augment", None) or {}
    _reject_unknown(augment, DATA_DEFAULTS["augment"], "data.augment")
    cfg.update(data_cfg)
    cfg["demo"].update(demo)
    cfg["augment"].update(augment)

    files = cfg["train_files"]
    if isinstance(files, str):
        cfg["train_files"] = files = [files]
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) and f for f in files):
        raise DataError(f"data.train_files = {files!r}: expected a list of JSON file paths "
                        "(empty for the built-in demo).")
    shards = cfg["train_shards"]
    if isinstance(shards, str):
        shards = [shards]
    if shards is not None and (not isinstance(shards, (list, tuple)) or not shards
                               or not all(isinstance(s, str) and s for s in shards)):
        raise DataError(f"data.train_shards = {cfg['train_shards']!r}: expected a brace pattern such "
                        'as "/data/shard-{000000..000099}.tar", a list of .tar files, or null.')
    cfg["train_shards"] = None if shards is None else list(shards)
    if shards is not None and files:
        raise DataError("data.train_files and data.train_shards are both set; train on one of them "
                        "(set the other to [] / null).")
    cache = cfg["index_cache"]
    if cache is not None and not (isinstance(cache, str) and cache):
        raise DataError(f"data.index_cache = {cache!r}: expected auto, a folder, or null (no cache).")
    _check_int(cfg["shuffle_buffer"], "data.shuffle_buffer", minimum=0)
    ImageRoot(cfg["image_root"], "data.image_root")
    ImageRoot(cfg["eval_image_root"], "data.eval_image_root")
    if cfg["eval_file"] is not None and not (isinstance(cfg["eval_file"], str) and cfg["eval_file"]):
        raise DataError(f"data.eval_file = {cfg['eval_file']!r}: expected a path or null.")
    check_bad_sample_policy(cfg["on_bad_sample"], cfg["max_bad_fraction"])
    for key in _POSITIVE_INTS:
        _check_int(cfg[key], f"data.{key}", minimum=1)
    if cfg["num_workers"] != AUTO:
        _check_int(cfg["num_workers"], "data.num_workers", minimum=0, alternative="auto or ")
    for key in _BOOLS:
        if not isinstance(cfg[key], bool):
            raise DataError(f"data.{key} = {cfg[key]!r}: expected true or false.")
    if cfg["pin_memory"] != AUTO and not isinstance(cfg["pin_memory"], bool):
        raise DataError(f"data.pin_memory = {cfg['pin_memory']!r}: expected auto, true or false.")
    cfg["augment"] = resolve_augment(cfg["augment"])
    for key, minimum in (("n", 1), ("eval_n", 1), ("seed", 0), ("size", 16)):
        _check_int(cfg["demo"][key], f"data.demo.{key}", minimum=minimum)
    if must_exist:
        _check_paths(cfg)
    return DataSettings(to_config(cfg))


def _check_paths(cfg: Dict[str, Any]) -> None:
    """The annotation files and image folders named exist (shards are found, and checked, by pattern)."""
    for i, path in enumerate(cfg["train_files"]):
        if not os.path.isfile(path):
            raise DataError(f"data.train_files[{i}] = {path!r} does not exist: check the path "
                            "(relative paths start from the folder the command runs in)")
    if cfg["eval_file"] is not None and not os.path.isfile(cfg["eval_file"]):
        raise DataError(f"data.eval_file = {cfg['eval_file']!r} does not exist: check the path")
    for key in ("image_root", "eval_image_root"):
        root = cfg[key]
        folder = root if isinstance(root, str) else (root or {}).get("to")
        if folder and not os.path.isdir(folder):
            raise DataError(f"data.{key} = {root!r}: the folder {folder} does not exist")


def _reject_unknown(given: Dict, known: Dict, section: str) -> None:
    if not isinstance(given, dict):
        raise DataError(f"{section} = {given!r}: expected a mapping of settings.")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise DataError(f"unknown setting(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                        f"{section} accepts: {', '.join(known)}.")


def _check_int(value, name: str, minimum: int, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} = {value!r}: expected {alternative}an integer >= {minimum}.")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which schedulers and launchers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_ranks() -> int:
    """Ranks on this machine, as the launcher says (DeepSpeed: LOCAL_SIZE; torchrun: LOCAL_WORLD_SIZE)."""
    return max(1, int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1))


def loader_settings(cfg: Dict[str, Any], device_type: str, cpus: Optional[int] = None,
                    ranks_here: Optional[int] = None) -> Tuple[int, bool]:
    """(num_workers, pin_memory) of one rank's loaders, ``auto`` decided for ``device_type``.

    On a GPU each rank gets the CPUs it shares the machine with, less one for its own process, at
    most MAX_GPU_WORKERS, and pinned memory (asynchronous host-to-device copies). On the CPU the
    step itself needs the cores: CPU_WORKERS workers, nothing pinned.
    """
    workers, pin = cfg["num_workers"], cfg["pin_memory"]
    gpu = device_type != "cpu"
    if workers == AUTO:
        share = (cpus or usable_cpus()) // (ranks_here or local_ranks())
        workers = min(MAX_GPU_WORKERS, max(1, share - 1)) if gpu else CPU_WORKERS
    if pin == AUTO:
        pin = gpu
    return workers, pin


def eval_loader_settings(cfg: Dict[str, Any], device_type: str) -> Tuple[int, bool]:
    """(num_workers, pin_memory) of the evaluation image loader: on a GPU those of training; on the
    CPU none (the forward passes need every core, and workers would only compete with them)."""
    return loader_settings(cfg, device_type) if device_type != "cpu" else (0, False)
