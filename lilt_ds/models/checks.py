"""A config's model section checked before any tower is built: the towers exist by name, their weight
sources exist, unlock sets parse and fit the mode, pooling is known, ``model.init_from`` is readable
and fits the rest (an original LilT checkpoint: every tensor against the model built on the meta
device). ``load_config`` runs it; the same functions guard the build. What only a built
tower can tell (``top_k:K`` beyond its blocks, transformer-only items on a convolutional tower, an
adapter reduction wider than the tower) is checked when the tower is built.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..presets import base_defaults
from .efficient import parse_unlock
from .modes import check_checkpointing, check_mode, check_unlock_for_mode
from .sources import check_init_from, init_source
from .text import check_pooling, text_sources
from .vision import DEFAULT_IMAGE_SIZE, pretrained_kwargs, timm_model_name

PAIR_REPLACES = ("name", "pretrained")
"""Tower keys a pretrained pair replaces: a value other than the default would be ignored, so it is refused."""


def check_model_config(cfg) -> None:
    """Raise ConfigError (naming the key) for what ``build_model(cfg)`` would refuse; resolve
    ``model.image_size: null`` to the size the towers take."""
    mode = check_mode(cfg["mode"])
    model = cfg["model"]
    for kind in ("vision", "text"):
        tower = model[kind]
        parse_unlock(tower.get("unlock") or [], f"model.{kind}.unlock")
        check_unlock_for_mode(mode, kind, tower.get("unlock"))
        check_checkpointing(mode, kind, tower)
    check_init_from(model)
    source = init_source(model)
    if source is not None and source[0].KIND == "pair":
        _check_pair(cfg, source)
        return
    if source is not None:  # a weights source: its size unless the config names one
        _check_replaced_keys(model, ("pretrained",))
        if model.get("image_size") is None:
            model["image_size"] = source[0].native(source[1], model)["image_size"]
    if model.get("image_size") is None:
        model["image_size"] = DEFAULT_IMAGE_SIZE
    timm_model_name(model["vision"]["name"])
    pretrained_kwargs(model["vision"].get("pretrained"), resolve=False)
    text_sources(model["text"])
    check_pooling(model["text"].get("pooling", "cls"))
    if model["text"].get("adapter_position") == "branch_input":
        raise ConfigError("model.text.adapter_position=branch_input: BERT-family text towers are post-norm, with no "
                          "norm at the input of their attention and MLP branches; use output")
    if source is not None:  # every tensor of the checkpoint must fit the model the config builds
        source[0].match_state(source[1], _built_on_meta(cfg))
    elif model["vision"].get("patch_dropout"):
        _built_on_meta(cfg)  # the tower must have patch tokens


def _built_on_meta(cfg):
    """The config's model on the meta device: what only a built tower can tell, without memory or weights."""
    from .dual_encoder import build_model

    return build_model(cfg, load_weights=False, device="meta")


def _check_replaced_keys(model, keys) -> None:
    """A key whose value the source replaces may keep its default only: another value would be ignored."""
    where = f"model.init_from={model['init_from']}"
    defaults = base_defaults()["model"]
    for kind in ("vision", "text"):
        for key in keys:
            if model[kind].get(key) != defaults[kind][key]:
                what = "the pair brings both towers and their weights" if key == "name" else "it brings the weights"
                raise ConfigError(f"model.{kind}.{key}={model[kind][key]!r} with {where}: {what}, so this key "
                                  "would be ignored; remove it (or drop model.init_from)")


def _check_pair(cfg, source) -> None:
    model, (module, spec) = cfg["model"], source
    where = f"model.init_from={model['init_from']}"
    _check_replaced_keys(model, PAIR_REPLACES)
    if model["text"].get("tokenizer") is not None:
        raise ConfigError(f"model.text.tokenizer={model['text']['tokenizer']!r} with {where}: the pair's own "
                          "tokenizer is used; remove the key")
    if model["vision"].get("patch_dropout"):
        _built_on_meta(cfg)  # the tower must have patch tokens
    if (cfg.get("memory") or {}).get("frozen_recompute"):
        raise ConfigError(f"memory.frozen_recompute with {where}: frozen recomputation knows timm and BERT blocks "
                          "only; turn it off (model.<tower>.grad_checkpointing works for pairs)")
    native = module.native(spec, model)
    if model.get("image_size") is None:
        model["image_size"] = native["image_size"]
    elif native["image_size"] is not None and model["image_size"] != native["image_size"]:
        raise ConfigError(f"model.image_size={model['image_size']} with {where}, whose towers take "
                          f"{native['image_size']} px: set model.image_size=null (or {native['image_size']})")
    loss = (cfg.get("loss") or {}).get("type", "clip")
    if native["sigmoid"] and loss != "siglip":
        raise ConfigError(f"{where} is a SigLIP (sigmoid) pair, but loss.type={loss}: set loss.type=siglip "
                          "(its logit bias trains only with the sigmoid loss)")
