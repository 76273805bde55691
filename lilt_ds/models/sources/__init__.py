"""Where a whole model starts from: ``model.init_from`` = ``PREFIX:SPEC``, one module per prefix.

A *pair* source (``open_clip:``, ``hf:``) replaces both towers, both projections and the logit
scale (and bias) with those of one pretrained contrastive model, and brings its preprocessing and
tokenizer. A *weights* source (``lilt:``, the original LilT's ``checkpoint_XX.pth``) keeps this project's towers
(the names in ``model.vision`` / ``model.text``) and loads a whole checkpoint into them.
Each module is imported only when its prefix is used, as timm does with optional parts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from torch import nn

from ...errors import ConfigError

INIT_SOURCES = {
    "open_clip": "lilt_ds.models.sources.open_clip",
    "hf": "lilt_ds.models.sources.hf",
    "lilt": "lilt_ds.models.sources.lilt",
}
"""prefix -> module. A pair module defines ``KIND = "pair"``, ``check(spec, model_cfg)`` and
``build_pair(spec, model_cfg, load_weights) -> PairParts``; a weights module ``KIND = "weights"``,
``check(spec, model_cfg)``, ``native(spec, model_cfg)`` (the image size), ``match_state(spec, model)``
(the checkpoint under the model's names, or a ConfigError naming the keys that do not fit) and
``load_weights(model, spec, model_cfg)`` (after the unlocks)."""


@dataclass
class PairParts:
    """What a pair source hands to :class:`~lilt_ds.models.DualEncoder`."""

    vision: nn.Module  # a tower: kind, trunk, layout, width, model_name, mean, std, image_size
    text: nn.Module  # a tower: kind, trunk, layout, width, model_name, tokenizer()
    vision_proj: nn.Module  # features -> embedding (nn.Identity where the pair has none)
    text_proj: nn.Module
    logit_scale: float  # the log-scale s (forward returns exp(s))
    logit_bias: float | None = None
    extra: dict = field(default_factory=dict)  # what the source's exporter needs to write the model back


def parse_init_from(value) -> tuple[str, str] | None:
    """``"open_clip:ViT-B-32"`` -> ``("open_clip", "ViT-B-32")``; None -> None."""
    if value is None:
        return None
    prefix, sep, spec = str(value).partition(":")
    if not sep or prefix not in INIT_SOURCES or not spec:
        raise ConfigError(
            f"model.init_from={value!r}: expected {' | '.join(p + ':...' for p in INIT_SOURCES)} "
            "(open_clip:ViT-B-32, hf:openai/clip-vit-base-patch32, lilt:checkpoint_14.pth)"
        )
    return prefix, spec


def source_module(prefix: str) -> ModuleType:
    return importlib.import_module(INIT_SOURCES[prefix])


def init_source(model_cfg) -> tuple[ModuleType, str] | None:
    """(source module, spec) of ``model.init_from``, or None for the towers named in the config."""
    parsed = parse_init_from(model_cfg.init_from)
    return None if parsed is None else (source_module(parsed[0]), parsed[1])


def is_pair(model_cfg) -> bool:
    source = init_source(model_cfg)
    return source is not None and source[0].KIND == "pair"


def check_init_from(model_cfg) -> None:
    """Load-time checks of ``model.init_from`` / ``model.init_weights`` (no weights are read)."""
    source = init_source(model_cfg)
    if source is None:
        if model_cfg.init_weights is not None:
            raise ConfigError(
                f"model.init_weights={model_cfg.init_weights!r} is set without model.init_from: "
                "set model.init_from=open_clip:ARCH, or use model.vision.pretrained for a timm tower"
            )
        return
    module, spec = source
    module.check(spec, model_cfg)


def scalar_value(tensor) -> float | None:
    """A pair's logit scale or bias as a float (None stays None; a meta tensor, counted offline, gives 0)."""
    if tensor is None:
        return None
    return 0.0 if tensor.is_meta else float(tensor.detach().reshape(-1)[0])
