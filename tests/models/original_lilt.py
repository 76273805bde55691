"""Checkpoints of the original LilT code (github.com/codezakh/LilT) written as its PretrainHydra.py
writes them, and that code's forward pass, re-derived from its models/ (vit.py, med.py,
clip_adjustable.py, conventional_adapter.py) for tensors in its key layout.

The sizes are the original's ``tiny`` towers (DeiT-tiny: width 192, 12 blocks, 3 heads, patch 16;
BERT-tiny: 2 layers, width 128, 2 heads), at 32 px so that the tests run in seconds.
"""

import torch
import torch.nn.functional as F

VISION = dict(width=192, depth=12, heads=3, patch=16)
TEXT = dict(width=128, layers=2, heads=2, intermediate=512, vocab=30522, positions=512)
IMAGE_RES, EMBED_DIM, REDUCTION, TEMP = 32, 32, 4, 0.05


def _adapter_state(prefix, width, gen):
    down = width // REDUCTION
    return {
        f"{prefix}down_sampler.weight": torch.randn(down, width, generator=gen) * 0.05,
        f"{prefix}down_sampler.bias": torch.randn(down, generator=gen) * 0.05,
        f"{prefix}up_sampler.weight": torch.randn(width, down, generator=gen) * 0.05,
        f"{prefix}up_sampler.bias": torch.randn(width, generator=gen) * 0.05,
    }


def original_state(adapters: bool, seed: int = 0) -> dict:
    """``model.state_dict()`` of the original ``models.clip_adjustable.CLIP`` (tiny/tiny): random values,
    LayerNorms away from 1 and 0, so that every tensor that lands in the wrong place shows."""
    gen = torch.Generator().manual_seed(seed)
    w = lambda *shape: torch.randn(*shape, generator=gen) * 0.05
    norm = lambda prefix, width: {f"{prefix}.weight": 1 + w(width), f"{prefix}.bias": w(width)}
    linear = lambda prefix, out, inp: {f"{prefix}.weight": w(out, inp), f"{prefix}.bias": w(out)}
    d, p = VISION["width"], "visual_encoder."
    tokens = (IMAGE_RES // VISION["patch"]) ** 2 + 1
    state = {
        f"{p}cls_token": w(1, 1, d),
        f"{p}pos_embed": w(1, tokens, d),
        f"{p}patch_embed.proj.weight": w(d, 3, VISION["patch"], VISION["patch"]),
        f"{p}patch_embed.proj.bias": w(d),
    }
    for i in range(VISION["depth"]):
        b = f"{p}blocks.{i}."
        state.update(
            {
                **norm(b + "norm1", d),
                **linear(b + "attn.qkv", 3 * d, d),
                **linear(b + "attn.proj", d, d),
                **norm(b + "norm2", d),
                **linear(b + "mlp.fc1", 4 * d, d),
                **linear(b + "mlp.fc2", d, 4 * d),
            }
        )
        if adapters:
            state.update({**_adapter_state(b + "adapter1.", d, gen), **_adapter_state(b + "adapter2.", d, gen)})
    state.update(norm(p + "norm", d))
    h, t = TEXT["width"], "text_encoder."
    state.update(
        {
            f"{t}embeddings.word_embeddings.weight": w(TEXT["vocab"], h),
            f"{t}embeddings.position_embeddings.weight": w(TEXT["positions"], h),
            f"{t}embeddings.position_ids": torch.arange(TEXT["positions"]).expand(1, -1),
            **norm(t + "embeddings.LayerNorm", h),
        }
    )
    for i in range(TEXT["layers"]):
        b = f"{t}encoder.layer.{i}."
        for part in ("query", "key", "value"):
            state.update(linear(f"{b}attention.self.{part}", h, h))
        state.update(
            {
                **linear(b + "attention.output.dense", h, h),
                **norm(b + "attention.output.LayerNorm", h),
                **linear(b + "intermediate.dense", TEXT["intermediate"], h),
                **linear(b + "output.dense", h, TEXT["intermediate"]),
                **norm(b + "output.LayerNorm", h),
            }
        )
        if adapters:
            state.update(
                {
                    **_adapter_state(b + "attention.output.adapter.", h, gen),
                    **_adapter_state(b + "output.adapter.", h, gen),
                }
            )
    state.update(
        {**linear("vision_proj", EMBED_DIM, d), **linear("text_proj", EMBED_DIM, h), "temp": torch.tensor(TEMP)}
    )
    return state


def write_original_checkpoint(path, adapters: bool = True, seed: int = 0, state: dict | None = None) -> str:
    """``checkpoint_14.pth`` as PretrainHydra.py saves it: the model, an AdamW state, the scheduler's,
    the Hydra config (an OmegaConf DictConfig) and the epoch."""
    from omegaconf import OmegaConf

    state = original_state(adapters, seed) if state is None else state
    trainable = [k for k in state if "adapter" in k or "norm" in k.lower() or "proj" in k or k == "temp"]
    optimizer = {
        "state": {
            i: {
                "step": torch.tensor(100.0),
                "exp_avg": torch.zeros_like(state[k]),
                "exp_avg_sq": torch.zeros_like(state[k]),
            }
            for i, k in enumerate(trainable)
        },
        "param_groups": [{"lr": 1e-5, "weight_decay": 0.02, "params": list(range(len(trainable)))}],
    }
    config = OmegaConf.create(
        {
            "text_encoder": "tiny",
            "vision_encoder": "tiny",
            "image_res": IMAGE_RES,
            "embed_dim": EMBED_DIM,
            "temp": 0.07,
            "freeze_text_encoder": True,
            "freeze_vision_encoder": True,
            "unlock_layernorm": True,
            "conventional_adapter": {"insert": adapters, "reduction_factor": REDUCTION},
            "always_freeze": {"visual_encoder": [], "text_encoder": []},
            "schedular": {"sched": "cosine", "lr": 1e-4, "epochs": 15},
        }
    )
    torch.save(
        {
            "model": state,
            "optimizer": optimizer,
            "lr_scheduler": {"base_values": [1e-4], "t_in_epochs": True},
            "config": config,
            "epoch": 14,
        },
        str(path),
    )
    return str(path)


# ----------------------------------------------------------------- the original's forward pass
def _adapter(state, prefix, x):  # conventional_adapter.Adapter: x + up(GELU(down(x)))
    z = F.gelu(F.linear(x, state[prefix + "down_sampler.weight"], state[prefix + "down_sampler.bias"]))
    return x + F.linear(z, state[prefix + "up_sampler.weight"], state[prefix + "up_sampler.bias"])


def _ln(state, prefix, x, eps):
    return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)


def _lin(state, prefix, x):
    return F.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])


def _heads(x, n):
    b, length, c = x.shape
    return x.reshape(b, length, n, c // n).transpose(1, 2)


def original_image_features(state, images, adapters: bool):
    """vit.VisionTransformer, then ``vision_proj`` of the CLS token, normalised."""
    p, n = "visual_encoder.", VISION["heads"]
    x = (
        F.conv2d(
            images, state[p + "patch_embed.proj.weight"], state[p + "patch_embed.proj.bias"], stride=VISION["patch"]
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([state[p + "cls_token"].expand(len(x), -1, -1), x], dim=1)
    x = x + state[p + "pos_embed"][:, : x.size(1)]
    for i in range(VISION["depth"]):
        b = f"{p}blocks.{i}."
        h = _ln(state, b + "norm1", _adapter(state, b + "adapter1.", x) if adapters else x, 1e-6)
        q, k, v = _lin(state, b + "attn.qkv", h).chunk(3, dim=-1)
        q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
        attn = (q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)).softmax(dim=-1)
        x = x + _lin(state, b + "attn.proj", (attn @ v).transpose(1, 2).flatten(2))
        h = _ln(state, b + "norm2", _adapter(state, b + "adapter2.", x) if adapters else x, 1e-6)
        x = x + _lin(state, b + "mlp.fc2", F.gelu(_lin(state, b + "mlp.fc1", h)))
    x = _ln(state, p + "norm", x, 1e-6)
    return F.normalize(_lin(state, "vision_proj", x[:, 0]), dim=-1)


def original_text_features(state, input_ids, attention_mask, adapters: bool):
    """med.BertModel in mode="text" (no token-type embedding), then ``text_proj`` of CLS, normalised."""
    t, n = "text_encoder.", TEXT["heads"]
    positions = torch.arange(input_ids.shape[1])
    x = (
        state[t + "embeddings.word_embeddings.weight"][input_ids]
        + state[t + "embeddings.position_embeddings.weight"][positions]
    )
    x = _ln(state, t + "embeddings.LayerNorm", x, 1e-12)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(TEXT["layers"]):
        b = f"{t}encoder.layer.{i}."
        q, k, v = (_heads(_lin(state, f"{b}attention.self.{part}", x), n) for part in ("query", "key", "value"))
        probs = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5 + mask).softmax(dim=-1)
        a = _lin(state, b + "attention.output.dense", (probs @ v).transpose(1, 2).flatten(2))
        a = _adapter(state, b + "attention.output.adapter.", a) if adapters else a
        a = _ln(state, b + "attention.output.LayerNorm", a + x, 1e-12)
        o = _lin(state, b + "output.dense", F.gelu(_lin(state, b + "intermediate.dense", a)))
        o = _adapter(state, b + "output.adapter.", o) if adapters else o
        x = _ln(state, b + "output.LayerNorm", o + a, 1e-12)
    return F.normalize(_lin(state, "text_proj", x[:, 0]), dim=-1)
