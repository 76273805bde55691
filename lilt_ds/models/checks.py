"""A config's model section checked before any tower is built: the towers exist by name, their weight
sources exist, unlock sets parse and fit the mode, pooling is known, ``model.init_from`` is readable
and fits the rest (an original LilT checkpoint: every tensor against the model built on the meta
device). ``load_config`` runs it; the same functions guard the build. What only a built
tower can tell (``top_k:K`` beyond its blocks, transformer-only items on a convolutional tower, an
adapter reduction wider than the tower) is checked when the tower is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..schema import TextSettings, VisionSettings
from .efficient import parse_unlock
from .modes import check_checkpointing, check_unlock_for_mode
from .sources import check_init_from, init_source
from .text import text_sources
from .vision import DEFAULT_IMAGE_SIZE, pretrained_kwargs, timm_model_name

PAIR_REPLACES = ("name", "pretrained")
"""Tower keys a pretrained pair replaces: a value other than the default would be ignored, so it is refused."""


@dataclass(frozen=True)
class ModelFacts:
    """What checking the model section found out: the image size the towers take, and what
    ``model.init_from`` is (a pair, a weights file or nothing) for the checks across sections."""

    image_size: int
    kind: str | None = None  # "pair" | "weights" | None
    sigmoid: bool | None = None  # a pair trained with the sigmoid (SigLIP) loss
    context_length: int | None = None  # a pair's text positions (None: unknown before a download)


def check_model_config(cfg) -> ModelFacts:
    """Raise ConfigError (naming the key) for what ``build_model(cfg)`` would refuse; the image size
    ``model.image_size: null`` resolves to."""
    model = cfg.model
    for kind in ("vision", "text"):
        tower = getattr(model, kind)
        parse_unlock(tower.unlock, f"model.{kind}.unlock")
        check_unlock_for_mode(cfg.mode, kind, tower.unlock)
        check_checkpointing(cfg.mode, kind, tower)
    check_init_from(model)
    source = init_source(model)
    if source is not None and source[0].KIND == "pair":
        return _check_pair(cfg, source)
    image_size = model.image_size
    if source is not None:  # a weights source: its size unless the config names one
        _check_replaced_keys(model, ("pretrained",))
        if image_size is None:
            image_size = source[0].native(source[1], model)["image_size"]
    image_size = image_size or DEFAULT_IMAGE_SIZE
    timm_model_name(model.vision.name)
    pretrained_kwargs(model.vision.pretrained, resolve=False)
    text_sources(model.text)
    if model.text.adapter_position == "branch_input":
        raise ConfigError(
            "model.text.adapter_position=branch_input: BERT-family text towers are post-norm, with no "
            "norm at the input of their attention and MLP branches; use output"
        )
    if source is not None:  # every tensor of the checkpoint must fit the model the config builds
        source[0].match_state(source[1], _built_on_meta(cfg, image_size))
    elif model.vision.patch_dropout:
        _built_on_meta(cfg, image_size)  # the tower must have patch tokens
    return ModelFacts(image_size, None if source is None else source[0].KIND)


def _built_on_meta(cfg, image_size: int):
    """The config's model on the meta device: what only a built tower can tell, without memory or weights."""
    from ..schema import replace_keys
    from .dual_encoder import build_model

    return build_model(replace_keys(cfg, {"model.image_size": image_size}), load_weights=False, device="meta")


def _check_replaced_keys(model, keys) -> None:
    """A key whose value the source replaces may keep its default only: another value would be ignored."""
    where = f"model.init_from={model.init_from}"
    defaults = {"vision": VisionSettings(), "text": TextSettings()}
    for kind in ("vision", "text"):
        for key in keys:
            value = getattr(getattr(model, kind), key)
            if value != getattr(defaults[kind], key):
                what = "the pair brings both towers and their weights" if key == "name" else "it brings the weights"
                raise ConfigError(
                    f"model.{kind}.{key}={value!r} with {where}: {what}, so this key "
                    "would be ignored; remove it (or drop model.init_from)"
                )


def _check_pair(cfg, source) -> ModelFacts:
    model, (module, spec) = cfg.model, source
    where = f"model.init_from={model.init_from}"
    _check_replaced_keys(model, PAIR_REPLACES)
    if model.text.tokenizer is not None:
        raise ConfigError(
            f"model.text.tokenizer={model.text.tokenizer!r} with {where}: the pair's own "
            "tokenizer is used; remove the key"
        )
    native = module.native(spec, model)
    image_size = model.image_size
    if image_size is None:
        image_size = native["image_size"]
    elif native["image_size"] is not None and image_size != native["image_size"]:
        raise ConfigError(
            f"model.image_size={image_size} with {where}, whose towers take "
            f"{native['image_size']} px: set model.image_size=null (or {native['image_size']})"
        )
    if model.vision.patch_dropout:
        _built_on_meta(cfg, image_size)  # the tower must have patch tokens
    return ModelFacts(image_size, "pair", native["sigmoid"], native.get("context_length"))
