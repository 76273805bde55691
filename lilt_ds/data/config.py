"""The `data` section of the experiment config: its defaults, and the checks that reject unknown
keys and bad values before anything is loaded."""

import copy
from typing import Any, Dict

from ..config import base_defaults
from .bad_samples import check_bad_sample_policy
from .errors import DataError
from .image_root import ImageRoot

# the one list of keys and defaults is the experiment schema, lilt_ds/configs/_base.yaml
DATA_DEFAULTS: Dict[str, Any] = base_defaults()["data"]

_POSITIVE_INTS = ("max_words", "max_length", "eval_max_length")
_BOOLS = ("clean_captions", "hflip", "pin_memory", "persistent_workers")


def resolve_data_config(data_cfg: Dict[str, Any] = None) -> Dict[str, Any]:
    """A complete, checked copy of `data_cfg`: missing keys take DATA_DEFAULTS, unknown keys and
    bad values raise DataError naming the key (`data.<key>`) and what it accepts."""
    data_cfg = dict(data_cfg or {})
    cfg = copy.deepcopy(DATA_DEFAULTS)
    _reject_unknown(data_cfg, DATA_DEFAULTS, "data")
    demo = data_cfg.pop("demo", None) or {}
    _reject_unknown(demo, DATA_DEFAULTS["demo"], "data.demo")
    cfg.update(data_cfg)
    cfg["demo"].update(demo)

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
    _check_int(cfg["num_workers"], "data.num_workers", minimum=0)
    for key in _BOOLS:
        if not isinstance(cfg[key], bool):
            raise DataError(f"data.{key} = {cfg[key]!r}: expected true or false.")
    if cfg["randaugment"] is not None and not isinstance(cfg["randaugment"], str):
        raise DataError(f"data.randaugment = {cfg['randaugment']!r}: expected a timm RandAugment "
                        'string such as "rand-m7-n2", or null.')
    for key, minimum in (("n", 1), ("eval_n", 1), ("seed", 0), ("size", 16)):
        _check_int(cfg["demo"][key], f"data.demo.{key}", minimum=minimum)
    return cfg


def _reject_unknown(given: Dict, known: Dict, section: str) -> None:
    if not isinstance(given, dict):
        raise DataError(f"{section} = {given!r}: expected a mapping of settings.")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise DataError(f"unknown setting(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                        f"{section} accepts: {', '.join(known)}.")


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} = {value!r}: expected an integer >= {minimum}.")
