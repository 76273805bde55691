"""The original LilT code's flags (``PretrainHydra.py --overrides``), translated into this project's keys.

A flag such as ``freeze_vision_encoder=True`` or ``unlock_layernorm=vision_only`` sets several of our
keys at once, and what it sets depends on the other flags (the two ``freeze_*`` flags together pick
the mode; an unlock flag reaches only the towers that mode locks). So the flags are collected from
the overrides and translated after all the others, in an order that does not depend on theirs.
The one-to-one aliases (``vision_encoder=base``, ``batch_size=128``) are ``presets.ALIASES``.
"""

from __future__ import annotations

import math

from .errors import ConfigError
from .models.modes import LOCKED_TOWERS
from .presets import parse_override

SCOPES = {True: ("vision", "text"), "vision_only": ("vision",), "language_only": ("text",), False: ()}
"""The original's values of a per-tower flag -> the towers it reaches."""

UNLOCK_FLAGS = {  # flag -> (our unlock item, the values it takes)
    "unlock_layernorm": ("ln", tuple(SCOPES)),
    "bitfit": ("bitfit", tuple(SCOPES)),
    "unlock_attn": ("attn", (True, False)),
    "unlock_dense": ("mlp", (True, False)),
    "add_adapter": ("top_k:1", (True, False)),
    "conventional_adapter.insert": ("adapters", tuple(SCOPES)),
}
FLAGS = ("freeze_vision_encoder", "freeze_text_encoder", *UNLOCK_FLAGS, "conventional_adapter.reduction_factor", "temp")

UNSUPPORTED = {
    "unlock_random": "its random choice of one weight per block is not reproducible; unlock attn or mlp instead",
    "adapter_append": "an appended block is not an architecture lilt_ds builds; use top_k:1 or adapters",
    "always_freeze.visual_encoder": "there is no per-block lock; choose what trains with model.vision.unlock",
    "always_freeze.text_encoder": "there is no per-block lock; choose what trains with model.text.unlock",
    "fp16": "precision belongs to the ds_config: --deepspeed_config ds_configs/zero2.json trains in bf16",
    "model_config.import_path": "the model class is always lilt_ds's DualEncoder",
}


def split_flags(overrides) -> tuple[list[str], dict[str, object]]:
    """(our overrides, {original flag: value}); an original flag lilt_ds cannot honour is refused."""
    ours, flags = [], {}
    for text in overrides:
        key, value, _ = parse_override(text)
        if key in UNSUPPORTED:
            raise ConfigError(f"override {text!r}: the original LilT's {key} is not supported: {UNSUPPORTED[key]}")
        if key in FLAGS:
            flags[key] = value
        else:
            ours.append(text)
    return ours, flags


def _check_value(flag: str, value, allowed) -> None:
    if not isinstance(value, (bool, str)) or value not in allowed:
        shown = ", ".join("True" if v is True else "False" if v is False else v for v in allowed)
        raise ConfigError(f"override {flag}={value!r}: the original LilT's {flag} takes {shown}")


def _set(cfg, key: str, value, flag: str, explicit: dict) -> None:
    """Set a dotted key for ``flag``, unless an override of ours gave it another value."""
    if key in explicit and explicit[key] != value:
        raise ConfigError(
            f"{flag} sets {key}={value}, but the overrides also set {key}={explicit[key]}: keep one of them"
        )
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def apply_flags(cfg, flags: dict, explicit: dict) -> None:
    """Set our keys from the original flags; ``explicit``: the keys and values our overrides set."""
    if not flags:
        return
    for flag in ("freeze_vision_encoder", "freeze_text_encoder"):
        if flag in flags:
            _check_value(flag, flags[flag], (True, False))
    if "freeze_vision_encoder" in flags or "freeze_text_encoder" in flags:
        locked = (bool(flags.get("freeze_vision_encoder")), bool(flags.get("freeze_text_encoder")))
        mode = {(False, False): "clip", (True, False): "lit", (True, True): "lilt"}.get(locked)
        if mode is None:
            raise ConfigError(
                "freeze_text_encoder=True without freeze_vision_encoder=True: lilt_ds locks the text "
                "tower only together with the image tower; add freeze_vision_encoder=True (mode=lilt)"
            )
        _set(cfg, "mode", mode, "freeze_vision_encoder / freeze_text_encoder", explicit)
    locked_towers = LOCKED_TOWERS.get(cfg["mode"], ())
    for flag, (item, allowed) in UNLOCK_FLAGS.items():
        if flag not in flags:
            continue
        _check_value(flag, flags[flag], allowed)
        towers = SCOPES[flags[flag]]
        trained = [kind for kind in towers if kind not in locked_towers]
        if item == "adapters" and trained:
            raise ConfigError(
                f"{flag}={flags[flag]} inserts adapters into the {' and '.join(trained)} tower, which "
                f"mode={cfg['mode']} trains whole: lilt_ds adds adapters to locked towers only; "
                "lock it (freeze_*_encoder=True) or limit the flag (vision_only / language_only)"
            )
        if towers and not set(towers) & set(locked_towers):
            raise ConfigError(
                f"{flag}={flags[flag]} unlocks parts of a locked tower, but mode={cfg['mode']} locks "
                f"no {' or '.join(towers)} tower; add freeze_vision_encoder=True (and "
                "freeze_text_encoder=True)"
            )
        for kind in towers:
            unlock = list(cfg["model"][kind]["unlock"] or [])
            if kind in locked_towers and item not in unlock:
                cfg["model"][kind]["unlock"] = [*unlock, item]
        if item == "adapters" and "vision" in towers:  # the original's ViT adapters sit before norm1 / norm2
            _set(cfg, "model.vision.adapter_position", "branch_input", flag, explicit)
    if "conventional_adapter.reduction_factor" in flags:
        for kind in ("vision", "text"):
            _set(
                cfg,
                f"model.{kind}.adapter_reduction",
                flags["conventional_adapter.reduction_factor"],
                "conventional_adapter.reduction_factor",
                explicit,
            )
    if "temp" in flags:
        temp = flags["temp"]
        if not isinstance(temp, (int, float)) or isinstance(temp, bool) or temp <= 0:
            raise ConfigError(f"override temp={temp!r}: the original's temperature is a positive number, e.g. 0.07")
        _set(cfg, "model.init_logit_scale", math.log(1 / temp), "temp", explicit)
