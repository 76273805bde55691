"""Trainable-weights export: a small safetensors file that, with the named base towers, is the model.

A LilT run trains a few percent of the weights; its export holds only those (fp32), with the
resolved config and the frozen-weight fingerprint as metadata, so ``load_exported(path)`` rebuilds
the full model from the base towers and refuses different ones. ``--full`` writes a consolidated
fp32 state_dict of the whole model instead, for users who want one self-contained file.

    python launch/export.py --checkpoint outputs/run --out run.safetensors [--full]
"""

from __future__ import annotations

import glob
import json
import os

import torch

from .checkpoint import check_identity, read_meta, resolve_checkpoint, run_identity
from .config import config_from_dict
from .ds_compat import is_zero3
from .errors import ConfigError
from .fileio import atomic_path

CONFIG_KEY = "lilt_ds_config"
IDENTITY_KEY = "lilt_ds_identity"


def trainable_state_from_engine(engine) -> dict[str, torch.Tensor]:
    """fp32 values of the trainable weights: the optimizer's fp32 masters where there are any
    (bf16/fp16, every ZeRO stage), else the parameters themselves. Call on all ranks together."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        master = safe_get_full_fp32_param(param)
        if master is None:
            with deepspeed.zero.GatheredParameters([param], enabled=is_zero3(param)):
                master = param.detach().clone()
        state[name] = master.float().cpu().contiguous()
    return state


def trainable_state_from_checkpoint(root: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 trainable weights from a checkpoint folder, without an engine or a process group."""
    folder = os.path.join(root, tag)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag, exclude_frozen_parameters=True)
    except Exception:  # noqa: BLE001 - ZeRO-0 without fp32 masters: the module file holds the weights
        files = glob.glob(os.path.join(folder, "mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"checkpoint {folder} has no model states file; it is incomplete") from None
        try:
            state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"checkpoint {files[0]} cannot be read ({type(e).__name__}: {e}); it is corrupt"
            ) from None
    return {k: v.float().contiguous() for k, v in state.items()}


def save_exported(state: dict[str, torch.Tensor], cfg: dict, identity: dict, path: str) -> None:
    from safetensors.torch import save_file

    metadata = {CONFIG_KEY: json.dumps(cfg), IDENTITY_KEY: json.dumps(identity)}
    with atomic_path(path) as scratch:
        save_file(state, scratch, metadata=metadata)


def load_exported(path: str) -> torch.nn.Module:
    """Rebuild the trained DualEncoder from its base towers and an export (trainable-only or --full)."""
    from safetensors import safe_open

    from .models import build_model

    if not os.path.isfile(path):
        raise ConfigError(f"exported weights {path} do not exist")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if CONFIG_KEY not in metadata:
        raise ConfigError(f"{path} carries no lilt_ds config: export it with python launch/export.py")
    cfg = config_from_dict(json.loads(metadata[CONFIG_KEY]))
    full = metadata.get("lilt_ds_full") == "1"
    model = build_model(cfg, load_weights=not full)
    if not full:
        check_identity(json.loads(metadata[IDENTITY_KEY]), run_identity(cfg, model), f"export {path}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = model.load_state_dict(state, strict=False)
    lacking = sorted(trainable - set(state)) if not full else sorted(missing)
    if unexpected or lacking:
        raise ConfigError(
            f"export {path} does not fit the model its config builds: "
            f"unexpected {unexpected[:5]}, missing {lacking[:5]}"
        )
    return model.eval()


def load_trained(source: str):
    """(model, config) from a run folder, a checkpoint folder or an exported ``.safetensors`` file."""
    if source.endswith(".safetensors"):
        model = load_exported(source)
        from safetensors import safe_open

        with safe_open(source, "pt") as f:
            return model, config_from_dict(json.loads(f.metadata()[CONFIG_KEY]))
    from .models import build_model

    root, tag = resolve_checkpoint(source)
    meta = read_meta(root, tag)
    cfg = config_from_dict(meta["config"])
    model = build_model(cfg)
    check_identity(meta["identity"], run_identity(cfg, model), f"checkpoint {os.path.join(root, tag)}")
    model.load_state_dict(trainable_state_from_checkpoint(root, tag), strict=False)
    return model.eval(), cfg


def export_checkpoint(checkpoint: str, out: str, full: bool = False) -> str:
    root, tag = resolve_checkpoint(checkpoint)
    meta = read_meta(root, tag)
    state = trainable_state_from_checkpoint(root, tag)
    cfg, identity = meta["config"], meta["identity"]
    if not full:
        save_exported(state, cfg, identity, out)
        return out
    from safetensors.torch import save_file

    save_exported(state, cfg, identity, out + ".trainable")
    model = load_exported(out + ".trainable")
    os.remove(out + ".trainable")
    full_state = {k: v.float().contiguous() for k, v in model.state_dict().items()}
    save_file(full_state, out, metadata={CONFIG_KEY: json.dumps(cfg), "lilt_ds_full": "1"})
    return out
