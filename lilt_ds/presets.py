"""The experiment config's form: packaged YAML presets, the schema of defaults, Hydra-style overrides.

Every preset is merged onto ``configs/_base.yaml``, which lists every valid key with its default:
a key that is not there is a typo (``key=value`` fails with the closest valid keys) unless the
user adds it on purpose with ``+key=value``, as in Hydra. Values parse as YAML, so ``true``,
``1e-4`` and ``[ln,adapters]`` mean what they look like. Short aliases of the original project
(``vision_encoder=base text_encoder=base +save_last_only=True``) map to their dotted keys, and its
config name ``CLIPAdjustable`` is a preset.

What the values may be is checked by :func:`lilt_ds.config.load_config`, which also uses the
checks of the layers that own the keys; this module is what every layer may import.
"""

from __future__ import annotations

import copy
import difflib
import os
from importlib import resources
from typing import Any, Iterable

import yaml

from .errors import ConfigError

BASE_PRESET = "_base"
RESOLVED_MARKER = "config_name"  # written into every resolved config: the preset it came from

# short names of the original project's command lines -> dotted keys of our schema
ALIASES = {
    "vision_encoder": "model.vision.name",
    "text_encoder": "model.text.name",
    "embed_dim": "model.embed_dim",
    "image_size": "model.image_size",
    "image_res": "model.image_size",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "batch_size": "train.micro_batch_size",
    "disable_wandb": "logging.disable_wandb",
    "save_last_only": "checkpoint.save_last_only",
    "seed": "seed",
    "freeze_proj": "model.freeze_projections",
    "pretrained_vision": "model.vision.pretrained",
    "pretrained_text": "model.text.pretrained",
    "train_file": "data.train_files",
    "optimizer.lr": "train.lr",
    "optimizer.weight_decay": "train.weight_decay",
    "schedular.lr": "train.lr",
    "schedular.epochs": "train.epochs",
    "schedular.min_lr": "train.min_lr",
}
"""Flags of the original that set several keys (``freeze_vision_encoder``, ``unlock_layernorm``, ...)
are translated by :mod:`lilt_ds.original_flags`."""


class Config(dict):
    """A nested dict with attribute access (``cfg.model.vision.name``) that stays a plain mapping."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def to_config(value: Any) -> Any:
    if isinstance(value, dict):
        return Config({k: to_config(v) for k, v in value.items()})
    if isinstance(value, list):
        return [to_config(v) for v in value]
    return value


def available_presets() -> list[str]:
    folder = resources.files("lilt_ds") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and not p.name.startswith("_"))


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _preset_path(name: str) -> str:
    """A preset name (``lilt``) or a path to a YAML file."""
    if os.path.sep in name or name.endswith((".yaml", ".yml")):
        if not os.path.isfile(name):
            raise ConfigError(f"config file {name} does not exist")
        return name
    path = resources.files("lilt_ds") / "configs" / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, available_presets(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown config preset {name!r}.{hint} Presets: {', '.join(available_presets())}; "
            "or pass a path to a YAML file."
        )
    return str(path)


def base_defaults() -> dict:
    """Every valid key with its default (``configs/_base.yaml``), as plain dicts."""
    return _read_yaml(_preset_path(BASE_PRESET))


def walk(tree: dict, prefix: str = "", sections: bool = False):
    """(dotted name, value) of every value of a nested mapping; with ``sections``, of its sub-mappings too."""
    for k, v in tree.items():
        if isinstance(v, dict):
            if sections:
                yield prefix + k, v
            yield from walk(v, prefix + k + ".", sections)
        else:
            yield prefix + k, v


# Keys that moved: a config or override that still names one is told where it went.
MOVED_KEYS = {
    "data.hflip": "data.augment.hflip",
    "data.randaugment": "data.augment.randaugment (false turns it off, null keeps the preset's)",
}


def _unknown_key_error(key: str, tree: dict, source: str) -> ConfigError:
    if key in MOVED_KEYS:
        return ConfigError(f"config key {key!r} in {source} is now {MOVED_KEYS[key]}.")
    valid = [key for key, _ in walk(tree, sections=True)] + list(ALIASES)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Closest valid keys: {', '.join(close)}." if close else ""
    return ConfigError(f"unknown config key {key!r} in {source}.{hint} Use +{key}=VALUE to add a new key.")


def _merge(base: dict, update: dict, source: str, allow_new: bool = False, root: dict | None = None,
           path: str = "") -> None:
    """Merge ``update`` into ``base`` in place; a key ``base`` lacks is an error unless ``allow_new``."""
    root = base if root is None else root
    for k, v in update.items():
        dotted = path + k
        if k not in base:
            if not allow_new:
                raise _unknown_key_error(dotted, root, source)
            base[k] = copy.deepcopy(v)
        elif isinstance(base[k], dict) and isinstance(v, dict):
            _merge(base[k], v, source, allow_new, root, dotted + ".")
        else:
            base[k] = copy.deepcopy(v)


def parse_override(text: str) -> tuple[str, Any, bool]:
    """``key=value`` / ``+key=value`` -> (dotted key, YAML-parsed value, adds_new_key)."""
    if "=" not in text:
        raise ConfigError(f"malformed override {text!r}: expected key=value (or +key=value to add a key)")
    key, raw = text.split("=", 1)
    add = key.startswith("+")
    key = key.lstrip("+").strip()
    if not key or any(not part for part in key.split(".")) or " " in key:
        raise ConfigError(f"malformed override {text!r}: the key {key!r} must be a dotted name like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed override {text!r}: the value is not valid YAML ({e})") from None
    return ALIASES.get(key, key), _as_number(value), add


def _as_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_override(cfg: dict, text: str) -> None:
    key, value, add = parse_override(text)
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            if not add:
                raise _unknown_key_error(key, cfg, f"override {text!r}")
            node[part] = Config()
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} holds a value, not a section")
    if parts[-1] not in node and not add:
        raise _unknown_key_error(key, cfg, f"override {text!r}")
    node[parts[-1]] = to_config(value)


def read_config(name: str = "demo", overrides: Iterable[str] = ()) -> Config:
    """A preset name or YAML path merged onto the defaults, then the overrides: not yet checked."""
    cfg = base_defaults()
    preset = _read_yaml(_preset_path(name))
    # a run's resolved config.yaml (it names its preset) may carry keys added with +key=value
    _merge(cfg, preset, f"config {name}", allow_new=RESOLVED_MARKER in preset)
    cfg = to_config(cfg)
    cfg.setdefault(RESOLVED_MARKER, os.path.splitext(os.path.basename(name))[0])
    for text in overrides:
        apply_override(cfg, text)
    return cfg


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted names of the values of a nested mapping (not of its sections)."""
    return [key for key, _ in walk(tree, prefix)]


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
