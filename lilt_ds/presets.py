"""The experiment config as written: packaged YAML presets and Hydra-style overrides.

Every preset is merged onto the schema's defaults (:mod:`lilt_ds.schema`, which lists every valid
key): a key that is not there is a typo (``key=value`` fails with the closest valid keys) unless the
user adds it on purpose with ``+key=value``, as in Hydra. A section takes a mapping of its keys
(``data.demo={n: 48}``), merged onto what it holds. Values parse as YAML, so ``true``, ``1e-4`` and
``[ln,adapters]`` mean what they look like. Short aliases of the original project
(``vision_encoder=base text_encoder=base +save_last_only=True``) map to their dotted keys, and its
config name ``CLIPAdjustable`` is a preset. :func:`lilt_ds.config.load_config` checks the values.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .errors import ConfigError
from .schema import defaults_dict, unknown_key_error

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


@dataclass
class Draft:
    """A config as written, before its values are checked: the merged plain values (defaults, preset,
    overrides), the user's added keys (dotted name -> value) and the name of the preset or file."""

    values: dict
    extras: dict = field(default_factory=dict)
    name: str = "custom"


def _merge(base: dict, update: dict, source: str, extras: dict | None = None, path: str = "") -> None:
    """Merge ``update`` into ``base`` in place, section by section; a key ``base`` lacks is an error
    unless ``extras`` (a dict) collects it."""
    for k, v in update.items():
        dotted = path + k
        if k not in base:
            if extras is None:
                raise unknown_key_error(dotted, source, ALIASES)
            extras[dotted] = copy.deepcopy(v)
        elif isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{dotted} = {v!r} in {source}: expected a mapping of {', '.join(base[k])}")
            _merge(base[k], v, source, extras, dotted + ".")
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


def apply_override(draft: Draft, text: str) -> None:
    """One ``key=value`` (a section takes a mapping of its keys, merged) or ``+key=value`` (a new key)."""
    key, value, add = parse_override(text)
    source = f"override {text!r}"
    *parents, leaf = key.split(".")
    node = draft.values
    for i, part in enumerate(parents):
        if part not in node:
            break
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {'.'.join(parents[: i + 1])} holds a value, not a section")
    else:
        if leaf in node:
            _merge(node, {leaf: value}, source, None, key[: -len(leaf)])
            return
    if not add:
        raise unknown_key_error(key, source, ALIASES)
    draft.extras[key] = value


def read_config(name: str = "demo", overrides: Iterable[str] = ()) -> Draft:
    """A preset name or YAML path merged onto the schema's defaults, then the overrides: not yet checked."""
    preset = _read_yaml(_preset_path(name))
    draft = Draft(defaults_dict(), name=os.path.splitext(os.path.basename(name))[0])
    # a run's resolved config.yaml names its preset, and may carry keys added with +key=value
    resolved = RESOLVED_MARKER in preset
    if resolved:
        draft.name = preset.pop(RESOLVED_MARKER)
    _merge(draft.values, preset, f"config {name}", draft.extras if resolved else None)
    for text in overrides:
        apply_override(draft, text)
    return draft


def save_config(cfg, path: str) -> None:
    """A checked config (:class:`lilt_ds.schema.ExperimentConfig`) as YAML that reloads to the same config."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
