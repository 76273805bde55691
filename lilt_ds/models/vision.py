"""The image tower: any timm model by name, pooled features out (CLS token for ViTs)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping

import timm
import torch
from timm.layers import PatchDropout
from torch import nn

from ..errors import ConfigError
from ..schema import VisionSettings, as_section
from .efficient import TowerLayout
from .weights import PKG_PREFIX, check_pkg, resolve_pkg

# the LilT paper's sizes: DeiT (ViT patch 16) at widths 192/384/768/1024 (DeiT has no large)
VISION_PRESETS = {
    "tiny": "deit_tiny_patch16_224",
    "small": "deit_small_patch16_224",
    "base": "deit_base_patch16_224",
    "large": "vit_large_patch16_224",
}

DEFAULT_IMAGE_SIZE = 256
"""``model.image_size: null`` for a timm tower: the LilT paper's 256 px."""

# timm's ViT family (and models that name their parts like it)
TIMM_TRANSFORMER = TowerLayout(
    block=r"blocks\.(\d+)",
    attn_linears=r"blocks\.\d+\.attn\.(?:qkv|q_proj|k_proj|v_proj|proj)",
    attn_out=r"blocks\.\d+\.attn\.proj",
    mlp_linears=r"blocks\.\d+\.mlp\.(?:fc1|fc2)",
    mlp_out=r"blocks\.\d+\.mlp\.fc2",
    branch_norms=r"blocks\.\d+\.norm[12]",
)


def timm_model_name(name: str) -> str:
    name = VISION_PRESETS.get(name, name)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Closest timm models: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"unknown vision model {name!r} (model.vision.name).{hint} Use a preset "
            f"({', '.join(VISION_PRESETS)}) or any name from timm.list_models()."
        )
    return name


def _is_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or os.path.splitext(source)[1] in (
        ".pth",
        ".pt",
        ".bin",
        ".safetensors",
    )


def _local_dir_weights(folder: str) -> str:
    for fname in (
        "model.safetensors",
        "open_clip_model.safetensors",
        "pytorch_model.bin",
        "open_clip_pytorch_model.bin",
    ):
        if os.path.isfile(os.path.join(folder, fname)):
            return os.path.join(folder, fname)
    raise ConfigError(f"local-dir:{folder} holds no model.safetensors or pytorch_model.bin (model.vision.pretrained)")


def pretrained_kwargs(pretrained, resolve: bool = True) -> dict:
    """Translate ``model.vision.pretrained`` into timm.create_model arguments (timm resizes pos embeds).

    ``resolve=False`` only checks the source (a ``pkg:`` source is not converted into the cache)."""
    if pretrained in (None, False):
        return {"pretrained": False}
    if pretrained is True:
        return {"pretrained": True}
    if not isinstance(pretrained, str):
        raise ConfigError(f"model.vision.pretrained must be true, false or a string, got {pretrained!r}")
    if pretrained.startswith("hf-hub:"):
        return {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": pretrained[len("hf-hub:") :]}}
    source = pretrained
    if pretrained.startswith(PKG_PREFIX):
        if not resolve:
            check_pkg(pretrained)
            return {"pretrained": True}
        source = resolve_pkg(pretrained)
    elif pretrained.startswith("local-dir:"):
        folder = os.path.expanduser(pretrained[len("local-dir:") :])
        if not os.path.isdir(folder):
            raise ConfigError(f"vision weights folder {folder} does not exist (model.vision.pretrained={pretrained})")
        source = _local_dir_weights(folder)
    elif _is_local(pretrained):
        source = os.path.expanduser(pretrained)
    else:
        raise ConfigError(
            f"model.vision.pretrained={pretrained!r} is neither a file nor a known source: use true (timm's "
            "default weights), hf-hub:ORG/NAME, local-dir:DIR, a .pth/.safetensors path or pkg:PACKAGE"
        )
    if not os.path.isfile(source):
        raise ConfigError(f"vision weights file {source} does not exist (model.vision.pretrained={pretrained})")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": source}}


def patch_dropout_host(trunk: nn.Module) -> tuple[nn.Module, str, int] | None:
    """(module, attribute, prefix tokens) of the step where a ViT may drop patch tokens, after its
    position embedding: timm's ViTs (``patch_drop``; prefix = CLS and register tokens), a timm ViT
    inside OpenCLIP (``trunk.patch_drop``) and OpenCLIP's own ViT (``patch_dropout``, after its CLS)."""
    for host in (trunk, getattr(trunk, "trunk", None)):
        if isinstance(host, nn.Module) and hasattr(host, "patch_drop") and hasattr(host, "num_prefix_tokens"):
            return host, "patch_drop", host.num_prefix_tokens
    if hasattr(trunk, "patch_dropout") and hasattr(trunk, "class_embedding"):
        return trunk, "patch_dropout", 1
    return None


def set_patch_dropout(tower: nn.Module, prob: float) -> None:
    """FLIP's patch dropout in training: each sample keeps a random (1 - prob) of its patch tokens,
    drawn from the global RNG (restored on resume); evaluation sees every patch."""
    host = patch_dropout_host(tower.trunk)
    if host is None:
        raise ConfigError(
            f"model.vision.patch_dropout={prob}: the vision tower {tower.model_name!r} has no patch "
            "tokens to drop (a convolutional network, or a Hugging Face CLIP/SigLIP tower); set "
            "it to 0.0, or use a ViT"
        )
    module, attribute, prefix = host
    setattr(module, attribute, PatchDropout(prob, num_prefix_tokens=prefix))


def timm_eval_config(trunk: nn.Module, image_size: int) -> dict:
    """timm's resolved evaluation data config of a trunk (crop_pct, interpolation, crop mode), at the size
    the tower was built for."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(trunk)
    config["input_size"] = (3, image_size, image_size)
    return config


class VisionTower(nn.Module):
    """A timm trunk without classifier; ``forward(images)`` returns its pooled features [B, width]."""

    kind = "vision"

    def __init__(self, tower_cfg: VisionSettings | Mapping, image_size: int, load_weights: bool = True):
        super().__init__()
        tower_cfg = as_section(VisionSettings, tower_cfg, "model.vision")
        self.model_name = timm_model_name(tower_cfg.name)
        kwargs = pretrained_kwargs(tower_cfg.pretrained) if load_weights else {"pretrained": False}
        try:
            trunk = timm.create_model(self.model_name, num_classes=0, img_size=image_size, **kwargs)
        except TypeError as e:  # convolutional nets take any size and have no img_size argument
            if "img_size" not in str(e):
                raise
            trunk = timm.create_model(self.model_name, num_classes=0, **kwargs)
        self.trunk = trunk
        self.width = trunk.num_features
        self.layout = TIMM_TRANSFORMER
        self.image_size, self.interpolation = image_size, "bicubic"
        self.mean = tuple(trunk.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(trunk.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))
        self.eval_preprocess = {"source": "timm", "config": timm_eval_config(trunk, image_size)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)  # timm checkpoints non-reentrantly

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)
