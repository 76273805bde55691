"""Tiny pretrained pairs written the way users get them: OpenCLIP model folders and Hugging Face
CLIPModel / SiglipModel folders (random weights, saved by the libraries themselves)."""

import json
import os

import torch

OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE = 32

OPEN_CLIP_CFGS = {
    # OpenCLIP's CLIP class: its own ViT and text transformer (nn.MultiheadAttention, x @ proj projections)
    "clip": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    # a SigLIP-shaped CustomTextCLIP: a timm ViT with attention pooling, a bias-carrying Linear text
    # projection, last-token pooling without causal mask, and a logit bias
    "siglip": {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 160,
            "timm_model_name": "test_vit",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
        },
    },
}


def write_open_clip_folder(folder, kind="clip", seed=0):
    """An OpenCLIP model folder (open_clip_config.json + open_clip_model.safetensors) that
    ``open_clip.create_model_and_transforms("local-dir:" + folder)`` loads."""
    import open_clip
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(
            {
                "model_cfg": OPEN_CLIP_CFGS[kind],
                "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic"},
            },
            f,
        )
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + folder, load_weights=False)
    with torch.no_grad():  # a non-default temperature, so copying it is visible
        model.logit_scale.fill_(2.5)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "open_clip_model.safetensors")
    )
    return folder


def write_hf_folder(folder, tokenizer, kind="clip", seed=0):
    """A Hugging Face CLIPModel / SiglipModel folder with ``tokenizer`` saved beside it."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
