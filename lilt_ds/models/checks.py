"""A config's model section checked before any tower is built: the towers exist by name, their weight
sources exist, unlock sets parse and fit the mode, pooling is known. ``load_config`` runs it; the
same functions guard the build. What only a built tower can tell (``top_k:K`` beyond its blocks,
transformer-only items on a convolutional tower, an adapter reduction wider than the tower) is
checked when the tower is built.
"""

from __future__ import annotations

from .efficient import parse_unlock
from .modes import check_checkpointing, check_mode, check_unlock_for_mode
from .text import check_pooling, text_sources
from .vision import pretrained_kwargs, timm_model_name


def check_model_config(cfg) -> None:
    """Raise ConfigError (naming the key) for what ``build_model(cfg)`` would refuse."""
    mode = check_mode(cfg["mode"])
    model = cfg["model"]
    for kind in ("vision", "text"):
        tower = model[kind]
        parse_unlock(tower.get("unlock") or [], f"model.{kind}.unlock")
        check_unlock_for_mode(mode, kind, tower.get("unlock"))
        check_checkpointing(mode, kind, tower)
    timm_model_name(model["vision"]["name"])
    pretrained_kwargs(model["vision"].get("pretrained"), resolve=False)
    text_sources(model["text"])
    check_pooling(model["text"].get("pooling", "cls"))
