"""``model.init_from: hf:NAME_OR_FOLDER``: a Hugging Face ``CLIPModel`` or ``SiglipModel``, towers,
projections, logit scale (and SigLIP's bias), with the tokenizer and image processor settings of the
same folder or hub repository.

The towers are the model's ``vision_model`` / ``text_model``; their pooled outputs are what
``get_image_features`` / ``get_text_features`` project. SigLIP's text head (a Linear with bias) is
taken out of the text model as the text projection; its vision tower projects inside its attention
pooling head, so its projection is the identity. :func:`state_for_hf` writes the weights back.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..efficient import TowerLayout
from ..weights import local_folder_or_name
from . import PairParts, scalar_value
from .tower import PairTower

KIND = "pair"
MODEL_TYPES = ("clip", "siglip")

HF_ENCODER_LAYOUT = TowerLayout(  # CLIP and SigLIP encoders alike
    block=r"encoder\.layers\.(\d+)",
    attn_linears=r"encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)",
    attn_out=r"encoder\.layers\.\d+\.self_attn\.out_proj",
    mlp_linears=r"encoder\.layers\.\d+\.mlp\.(?:fc1|fc2)",
    mlp_out=r"encoder\.layers\.\d+\.mlp\.fc2",
    branch_norms=r"encoder\.layers\.\d+\.layer_norm[12]",
)


def model_source(spec: str) -> str:
    return local_folder_or_name(spec, f"model.init_from=hf:{spec}")


def _config(spec: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_source(spec))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from=hf:{spec}: no Hugging Face model config there ({e})") from None
    if config.model_type not in MODEL_TYPES:
        raise ConfigError(
            f"model.init_from=hf:{spec} is a {config.model_type!r} model: lilt_ds takes "
            f"{' and '.join(MODEL_TYPES)} pairs (CLIPModel, SiglipModel) from Hugging Face"
        )
    return config


def check(spec: str, model_cfg) -> None:
    _config(spec)
    if model_cfg.init_weights is not None:
        raise ConfigError(
            f"model.init_weights={model_cfg.init_weights!r} with model.init_from=hf:{spec}: "
            "the folder or hub repository brings its own weights; set model.init_weights=null"
        )


def native(spec: str, model_cfg) -> dict:
    config = _config(spec)
    return {
        "image_size": int(config.vision_config.image_size),
        "sigmoid": config.model_type == "siglip",
        "context_length": int(config.text_config.max_position_embeddings),
    }


def _image_settings(spec: str, config) -> dict:
    """mean, std, interpolation from the folder's preprocessor_config.json (the model's defaults else)."""
    settings = {
        "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711),
        "interpolation": "bicubic",
    }
    if config.model_type == "siglip":
        settings.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    path = os.path.join(model_source(spec), "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            pre = json.load(f)
        settings["mean"] = tuple(pre.get("image_mean", settings["mean"]))
        settings["std"] = tuple(pre.get("image_std", settings["std"]))
        settings["interpolation"] = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(pre.get("resample"), "bicubic")
    return settings


def _vision_features(trunk, images):
    return trunk(pixel_values=images).pooler_output


def _text_features(trunk, input_ids, attention_mask):
    return trunk(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _checkpointing(trunk, enable):
    trunk.encoder.gradient_checkpointing = enable  # transformers' encoders checkpoint each layer when set


def build_pair(spec: str, model_cfg, load_weights: bool = True) -> PairParts:
    from transformers import AutoModel

    config = _config(spec)
    model = AutoModel.from_pretrained(model_source(spec)) if load_weights else AutoModel.from_config(config)
    siglip = config.model_type == "siglip"
    if siglip:
        vision_proj, text_proj = nn.Identity(), model.text_model.head
        model.text_model.head = nn.Identity()
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
    else:
        vision_proj, text_proj = model.visual_projection, model.text_projection
        vision_width, text_width = vision_proj.in_features, text_proj.in_features
    name = f"hf:{spec}"
    vision = PairTower(
        "vision",
        model.vision_model,
        _vision_features,
        HF_ENCODER_LAYOUT,
        vision_width,
        name,
        _checkpointing,
        image_size=int(config.vision_config.image_size),
        eval_preprocess={"source": "hf", "folder": model_source(spec), "model_type": config.model_type},
        **_image_settings(spec, config),
    )
    text = PairTower(
        "text",
        model.text_model,
        _text_features,
        HF_ENCODER_LAYOUT,
        text_width,
        name,
        _checkpointing,
        context_length=config.text_config.max_position_embeddings if siglip else None,
    )
    bias = getattr(model, "logit_bias", None)
    return PairParts(
        vision,
        text,
        vision_proj,
        text_proj,
        scalar_value(model.logit_scale),
        scalar_value(bias),
        {"config": config.to_dict(), "siglip": siglip},
    )


class PairTokenizer:
    """The pair's tokenizer, truncating to at most the text tower's position count; SigLIP pools the
    last position, so its captions are always padded to the full length, as its processor does."""

    def __init__(self, tokenizer, context_length: int, pad_to_full: bool):
        self.tokenizer, self.context_length, self.pad_to_full = tokenizer, context_length, pad_to_full
        self.pad_token = tokenizer.pad_token

    def __call__(self, texts, padding="longest", truncation=True, max_length=None, return_tensors="pt"):
        length = min(max_length or self.context_length, self.context_length)
        out = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=length, return_tensors="pt")
        if self.pad_to_full and out["input_ids"].shape[1] < self.context_length:
            missing = self.context_length - out["input_ids"].shape[1]
            out = {
                "input_ids": F.pad(out["input_ids"], (0, missing), value=self.tokenizer.pad_token_id),
                "attention_mask": F.pad(out["attention_mask"], (0, missing), value=0),
            }
        return out


def build_tokenizer(spec: str, model_cfg) -> PairTokenizer:
    from transformers import AutoTokenizer

    config = _config(spec)
    tokenizer = AutoTokenizer.from_pretrained(model_source(spec))
    return PairTokenizer(tokenizer, config.text_config.max_position_embeddings, config.model_type == "siglip")


# ------------------------------------------------------------------------------ back to transformers
def state_for_hf(model, extra: dict) -> dict[str, torch.Tensor]:
    """The DualEncoder's weights under the names of CLIPModel / SiglipModel (LoRA merged by the caller)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("vision.trunk."):
            out["vision_model." + name[len("vision.trunk.") :]] = tensor
        elif name.startswith("text.trunk."):
            out["text_model." + name[len("text.trunk.") :]] = tensor
    if extra["siglip"]:
        out.update({"text_model.head." + k: v for k, v in model.text_proj.state_dict().items()})
    else:
        out["visual_projection.weight"] = model.vision_proj.weight
        out["text_projection.weight"] = model.text_proj.weight
    out["logit_scale"] = model.logit_scale.detach().reshape(())
    if model.logit_bias is not None:
        out["logit_bias"] = model.logit_bias.detach().reshape(-1)[:1].reshape(1)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
