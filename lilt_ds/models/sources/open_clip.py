"""``model.init_from: open_clip:ARCH``: both towers, projections and logit scale (and bias) of an OpenCLIP model.

ARCH is anything ``open_clip.create_model`` takes as a model name: a built-in architecture
(``ViT-B-32``, weights by ``model.init_weights`` = a pretrained tag or a file; none: random), an
``hf-hub:ORG/NAME`` or a ``local-dir:DIR`` model folder (config and weights from there). The pair's
preprocessing (size, mean/std, interpolation) and tokenizer come with it. Projections become
bias-free ``nn.Linear`` layers (OpenCLIP stores them as ``x @ proj`` matrices) so they train like
ours and are written back unchanged by :func:`state_for_open_clip`.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..efficient import TowerLayout
from . import PairParts, scalar_value
from .tower import PairTower

KIND = "pair"
LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
CONFIG_FILE = "open_clip_config.json"

# OpenCLIP's own transformer (ResidualAttentionBlock): attention is an nn.MultiheadAttention, whose
# packed in-projection and out-projection are read as weights (no Linear forward runs): adapters hook
# the attention module's output, LoRA reaches its weights by parametrization (efficient.py).
OPEN_CLIP_LAYOUT = TowerLayout(
    block=r"transformer\.resblocks\.(\d+)",
    attn_linears=r"transformer\.resblocks\.\d+\.attn",
    attn_out=r"transformer\.resblocks\.\d+\.attn",
    mlp_linears=r"transformer\.resblocks\.\d+\.mlp\.(?:c_fc|c_proj)",
    mlp_out=r"transformer\.resblocks\.\d+\.mlp\.c_proj",
    packed_attn=r"transformer\.resblocks\.\d+\.attn",
    branch_norms=r"transformer\.resblocks\.\d+\.ln_[12]",
)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ConfigError("model.init_from=open_clip:... needs OpenCLIP: pip install open_clip_torch") from None
    return open_clip


def local_dir(spec: str) -> str | None:
    return os.path.expanduser(spec[len(LOCAL_DIR) :]) if spec.startswith(LOCAL_DIR) else None


def model_config(spec: str, download: bool = False) -> dict | None:
    """OpenCLIP's ``{"model_cfg", "preprocess_cfg"}`` for ARCH, read without weights (for hf-hub: None,
    unless ``download``: then the repository's config file, from the hub cache once the model is built)."""
    folder = local_dir(spec)
    if folder is not None:
        path = os.path.join(folder, CONFIG_FILE)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model.init_from=open_clip:{spec}: {path} cannot be read ({e}); an OpenCLIP model "
                f"folder holds {CONFIG_FILE} and open_clip_model.safetensors"
            ) from None
    if spec.startswith(HF_HUB):
        if not download:
            return None
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(spec[len(HF_HUB) :], CONFIG_FILE)) as f:
            return json.load(f)
    cfg = _open_clip().get_model_config(spec)
    return None if cfg is None else {"model_cfg": cfg}


def check(spec: str, model_cfg) -> None:
    oc = _open_clip()
    weights = model_cfg.init_weights
    if local_dir(spec) is not None or spec.startswith(HF_HUB):
        if local_dir(spec) is not None and not os.path.isdir(local_dir(spec)):
            raise ConfigError(f"model.init_from=open_clip:{spec}: folder {local_dir(spec)} does not exist")
        model_config(spec)
        if weights is not None:
            raise ConfigError(
                f"model.init_weights={weights!r} with model.init_from=open_clip:{spec}: the folder or "
                "hub repository brings its own weights; set model.init_weights=null"
            )
        return
    if model_config(spec) is None:
        import difflib

        close = difflib.get_close_matches(spec, oc.list_models(), n=3)
        raise ConfigError(
            f"model.init_from=open_clip:{spec}: OpenCLIP has no architecture {spec!r}"
            + (f" (closest: {', '.join(close)})" if close else "")
            + "; use open_clip.list_models(), hf-hub:ORG/NAME or local-dir:DIR"
        )
    if (
        weights is not None
        and not os.path.isfile(os.path.expanduser(weights))
        and weights not in oc.list_pretrained_tags_by_model(spec)
    ):
        raise ConfigError(
            f"model.init_weights={weights!r} is neither a file nor a pretrained tag of {spec}: "
            f"choose from {', '.join(oc.list_pretrained_tags_by_model(spec)) or 'none'} or a weights file"
        )


def native(spec: str, model_cfg) -> dict:
    """What the config needs to know before building: the image size and whether the pair is sigmoid."""
    cfg = model_config(spec)
    if cfg is None:  # hf-hub: known only after download
        return {"image_size": None, "sigmoid": None, "context_length": None}
    vision = cfg["model_cfg"].get("vision_cfg", {})
    size = (cfg.get("preprocess_cfg") or {}).get("size") or vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {
        "image_size": int(size),
        "sigmoid": cfg["model_cfg"].get("init_logit_bias") is not None,
        "context_length": int(cfg["model_cfg"].get("text_cfg", {}).get("context_length", 77)),
    }


class _ClipTextParts(nn.Module):
    """The text half of OpenCLIP's ``CLIP`` class (it keeps the text tower's parts as its own
    attributes); ``forward`` is OpenCLIP's ``encode_text`` itself, without the projection."""

    def __init__(self, model):
        super().__init__()
        self.token_embedding, self.positional_embedding = model.token_embedding, model.positional_embedding
        self.transformer, self.ln_final = model.transformer, model.ln_final
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.text_pool_type = model.text_pool_type
        if hasattr(model, "text_eos_id"):
            self.text_eos_id = model.text_eos_id
        self.text_projection = None

    def forward(self, text):
        return _open_clip().model.CLIP.encode_text(self, text)


def _projection(proj) -> tuple[nn.Module, bool]:
    """(an nn.Module for OpenCLIP's projection, whether it was a matrix used as x @ proj)."""
    if proj is None:
        return nn.Identity(), False
    if isinstance(proj, nn.Parameter):
        linear = nn.Linear(proj.shape[0], proj.shape[1], bias=False)
        with torch.no_grad():
            linear.weight.copy_(proj.detach().t())
        return linear, True
    return proj, False


def _vision_features(trunk, images):
    return trunk(images)


def _text_features(trunk, input_ids, attention_mask):
    return trunk(input_ids)  # a causal (or last-token pooled) tower: padding needs no mask


def _checkpointing(trunk, enable):
    trunk.set_grad_checkpointing(enable)


def build_pair(spec: str, model_cfg, load_weights: bool = True) -> PairParts:
    oc = _open_clip()
    weights = model_cfg.init_weights if load_weights else None
    if weights is not None and os.path.isfile(os.path.expanduser(weights)):
        weights = os.path.expanduser(weights)
    # device=None: the model stays where torch builds it (the default device, or the meta device of an
    # offline count or of the memory estimator), as the native towers do
    model = oc.create_model(spec, pretrained=weights, load_weights=load_weights, device=None)
    visual, extra = model.visual, {"arch": spec}
    if isinstance(visual, oc.transformer.VisionTransformer):
        vision_proj, extra["vision_matrix"] = _projection(visual.proj)
        width = visual.transformer.width
        visual.proj = None
        vision_layout = OPEN_CLIP_LAYOUT
    elif isinstance(visual, oc.timm_model.TimmModel):
        vision_proj, visual.head, extra["vision_matrix"] = visual.head, nn.Identity(), False
        width, vision_layout = visual.trunk.num_features, _timm_layout()
    else:  # e.g. ModifiedResNet: its attention pool projects already; ln and bitfit still apply
        vision_proj, extra["vision_matrix"], vision_layout = nn.Identity(), False, None
        width = model.embed_dim if hasattr(model, "embed_dim") else visual.output_dim
    pre = getattr(visual, "preprocess_cfg", {}) or {}
    size = pre.get("size") or visual.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    vision = PairTower(
        "vision",
        visual,
        _vision_features,
        vision_layout,
        width,
        f"open_clip:{spec}",
        _checkpointing,
        mean=tuple(pre.get("mean", oc.OPENAI_DATASET_MEAN)),
        std=tuple(pre.get("std", oc.OPENAI_DATASET_STD)),
        interpolation=pre.get("interpolation", "bicubic"),
        image_size=int(size),
        eval_preprocess={
            "source": "open_clip",
            "resize_mode": pre.get("resize_mode", "shortest"),
            "interpolation": pre.get("interpolation", "bicubic"),
            "fill_color": pre.get("fill_color", 0),
        },
    )

    if hasattr(model, "text"):  # CustomTextCLIP
        text_trunk = model.text
        if not isinstance(text_trunk, oc.transformer.TextTransformer):
            raise ConfigError(
                f"model.init_from=open_clip:{spec}: its text tower is a {type(text_trunk).__name__} "
                "(a Hugging Face encoder inside OpenCLIP), which lilt_ds does not take from OpenCLIP: "
                "use model.init_from=hf:... or model.text.name=<the HF model> instead"
            )
        extra["custom_text"], projection = True, text_trunk.text_projection
    else:
        text_trunk, extra["custom_text"], projection = _ClipTextParts(model), False, model.text_projection
    text_proj, extra["text_matrix"] = _projection(projection)
    text_trunk.text_projection = None
    text = PairTower(
        "text",
        text_trunk,
        _text_features,
        OPEN_CLIP_LAYOUT,
        text_trunk.transformer.width,
        f"open_clip:{spec}",
        _checkpointing,
        context_length=text_trunk.positional_embedding.shape[0],
    )
    bias = getattr(model, "logit_bias", None)
    return PairParts(vision, text, vision_proj, text_proj, scalar_value(model.logit_scale), scalar_value(bias), extra)


def _timm_layout():
    from ..vision import TIMM_TRANSFORMER

    return TIMM_TRANSFORMER


class OpenClipTokenizer:
    """OpenCLIP's tokenizer behind the Hugging Face call the data pipeline makes: captions truncated to
    ``max_length`` tokens (the end token kept, as OpenCLIP truncates), padded to the context length
    the tower's position embeddings have."""

    pad_token = "<pad>"

    def __init__(self, tokenizer, pad_id: int = 0):
        self.tokenizer, self.pad_id = tokenizer, pad_id
        self.context_length = tokenizer.context_length

    def __call__(self, texts, padding=None, truncation=True, max_length=None, return_tensors="pt"):
        length = min(max_length or self.context_length, self.context_length)
        ids = self.tokenizer(list(texts), context_length=length).long()
        if length < self.context_length:
            ids = F.pad(ids, (0, self.context_length - length), value=self.pad_id)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}


def build_tokenizer(spec: str, model_cfg) -> OpenClipTokenizer:
    tokenizer = _open_clip().get_tokenizer(spec)
    inner = getattr(tokenizer, "tokenizer", None)  # OpenCLIP's HFTokenizer wraps a transformers tokenizer
    pad_id = getattr(inner, "pad_token_id", None)
    return OpenClipTokenizer(tokenizer, 0 if pad_id is None else pad_id)


# ------------------------------------------------------------------------------ back to OpenCLIP
def state_for_open_clip(model, extra: dict) -> dict[str, torch.Tensor]:
    """The DualEncoder's weights under OpenCLIP's names (LoRA merged by the caller; no adapters)."""
    out = {}
    text_prefix = "text." if extra["custom_text"] else ""
    for name, tensor in model.state_dict().items():
        if name.startswith("vision.trunk."):
            out["visual." + name[len("vision.trunk.") :]] = tensor
        elif name.startswith("text.trunk."):
            out[text_prefix + name[len("text.trunk.") :]] = tensor
    for kind, key, matrix in (
        ("vision", "visual.proj", extra["vision_matrix"]),
        ("text", text_prefix + "text_projection", extra["text_matrix"]),
    ):
        proj = getattr(model, f"{kind}_proj")
        if matrix:
            out[key] = proj.weight.detach().t().contiguous()
        else:
            base = "visual.head." if kind == "vision" else key + "."
            out.update({base + k: v for k, v in proj.state_dict().items()})
    out["logit_scale"] = model.logit_scale.detach().reshape(())
    if model.logit_bias is not None:
        out["logit_bias"] = model.logit_bias.detach().reshape(())
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}
