"""``model.init_from: lilt:CHECKPOINT.pth``: a run of the original LilT code (github.com/codezakh/LilT).

Its ``checkpoint_XX.pth`` is a ``torch.save`` of ``{"model", "optimizer", "lr_scheduler", "config",
"epoch"}``; ``model`` holds the whole model: ``visual_encoder.*`` (its DeiT, timm's names),
``text_encoder.*`` (a BERT without pooler or token-type embedding), ``vision_proj``, ``text_proj`` and
``temp`` (logits = similarity / temp). The config names the same architecture in this project's terms
(``vision_encoder=base text_encoder=base``, ``conventional_adapter.insert=True``: see presets.py), and
every tensor is loaded under its name here, or the config is refused naming the keys that do not fit.

Only the model is imported. The optimizer's state is keyed by the original's parameter groups, so
continued training starts a new optimizer and schedule from the checkpoint's weights.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import re
import types

import torch

from ...errors import ConfigError

KIND = "weights"

_VISION_ADAPTER = re.compile(r"blocks\.(\d+)\.adapter([12])\.(down|up)_sampler\.(weight|bias)")
_TEXT_ADAPTER = re.compile(
    r"(encoder\.layer\.\d+\.(?:attention\.output|output))\.adapter\.(down|up)_sampler\.(weight|bias)"
)
_BUFFERS = ("text_encoder.embeddings.position_ids",)  # the positions 0..N-1, rebuilt by transformers
_ZEROED = ("text.trunk.embeddings.token_type_embeddings.weight",)
"""Ours, not the original's: its BERT adds no token-type embedding, so ours is zero (the same output)."""
_NEW = re.compile(r".*(\.adapter\.|lora_).*|logit_bias")
"""Parameters the config may add to the original model (adapters, LoRA, SigLIP's bias): they start new."""


# ------------------------------------------------------------------------------------- the file
class _StandIn:
    """An object of a class that is not imported (the original's OmegaConf config): its pickled state only."""

    def __init__(self, *args, **kwargs):
        self.state = args or None

    def __setstate__(self, state):
        self.state = state


_SAFE_BUILTINS = {
    "dict",
    "list",
    "set",
    "frozenset",
    "tuple",
    "int",
    "float",
    "str",
    "bool",
    "bytes",
    "bytearray",
    "complex",
    "slice",
}


class _Unpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; any other class becomes a :class:`_StandIn`, so the file
    loads without the original's packages (omegaconf) and runs no code of its own."""

    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if (module == "builtins" and name in _SAFE_BUILTINS) or (module, name) in {
            ("collections", "OrderedDict"),
            ("collections", "defaultdict"),
            ("_codecs", "encode"),
            ("copyreg", "_reconstructor"),
            ("torch", "Size"),
            ("torch.nn.parameter", "Parameter"),
        }:
            return super().find_class(module, name)
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.device)):
            return super().find_class(module, name)
        if module.startswith(("numpy.core.multiarray", "numpy._core.multiarray", "numpy")) and name in (
            "_reconstruct",
            "scalar",
            "dtype",
            "ndarray",
        ):
            return super().find_class(module, name)
        return type(name, (_StandIn,), {"__module__": "lilt_ds.stand_in." + module})


_PICKLE = types.ModuleType("lilt_checkpoint_pickle")
_PICKLE.Unpickler = _Unpickler
_PICKLE.load = lambda f, **kw: _Unpickler(f, **kw).load()


def _plain(value):
    """An unpickled OmegaConf container (as stand-ins) or a plain value -> dicts, lists and scalars."""
    if isinstance(value, _StandIn):
        state = value.state
        state = state[0] if isinstance(state, tuple) and state and isinstance(state[0], dict) else state
        if isinstance(state, dict):
            for key in ("_content", "_val"):
                if key in state:
                    return _plain(state[key])
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _path(spec: str) -> str:
    path = os.path.expanduser(spec)
    if not os.path.isfile(path):
        raise ConfigError(
            f"model.init_from=lilt:{spec}: file {path} does not exist (an original LilT run's checkpoint_XX.pth)"
        )
    return path


def read_checkpoint(spec: str) -> dict:
    """``{"model": state, "config": dict or None, "epoch": int or None}`` of an original LilT checkpoint
    (memory-mapped: checking a big file reads little of it; read once while the file stays as it is)."""
    path = _path(spec)
    stat = os.stat(path)
    return _read(spec, path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read(spec: str, path: str, mtime_ns: int, size: int) -> dict:
    try:
        try:
            saved = torch.load(path, map_location="cpu", pickle_module=_PICKLE, weights_only=False, mmap=True)
        except RuntimeError as e:  # a file of the pre-zip format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            saved = torch.load(path, map_location="cpu", pickle_module=_PICKLE, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"model.init_from=lilt:{spec}: {path} is not a readable torch checkpoint ({e})") from None
    state = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not any(k.startswith(("visual_encoder.", "text_encoder.")) for k in state):
        raise ConfigError(
            f'model.init_from=lilt:{spec}: {path} is not an original LilT checkpoint (no "model" '
            "with visual_encoder.* and text_encoder.* tensors); a lilt_ds run resumes with --resume, "
            "and its exports load with launch/evaluate.py --checkpoint"
        )
    config = _plain(saved.get("config"))
    return {"model": state, "config": config if isinstance(config, dict) else None, "epoch": saved.get("epoch")}


def native(spec: str, model_cfg) -> dict:
    """The image size the checkpoint was trained at (from its position embedding)."""
    return {"image_size": native_size(read_checkpoint(spec)["model"])}


def native_size(state: dict) -> int | None:
    pos, patch = state.get("visual_encoder.pos_embed"), state.get("visual_encoder.patch_embed.proj.weight")
    return None if pos is None or patch is None else math.isqrt(pos.shape[1] - 1) * patch.shape[-1]


def check(spec: str, model_cfg) -> None:
    if model_cfg.init_weights is not None:
        raise ConfigError(
            f"model.init_weights={model_cfg.init_weights!r} with model.init_from=lilt:{spec}: the "
            "checkpoint brings every weight; set model.init_weights=null"
        )
    read_checkpoint(spec)


# --------------------------------------------------------------------------------- the mapping
def our_name(key: str) -> str | None:
    """The name in this project's DualEncoder of an original LilT tensor (None: a buffer not kept)."""
    if key in _BUFFERS:
        return None
    if key == "temp":
        return "logit_scale"
    if key.startswith("visual_encoder."):
        rest = key[len("visual_encoder.") :]
        m = _VISION_ADAPTER.fullmatch(rest)
        if m:  # before norm1 / norm2 of block i (model.vision.adapter_position=branch_input)
            rest = f"blocks.{m[1]}.norm{m[2]}.adapter.{m[3]}.{m[4]}"
        return "vision.trunk." + rest
    if key.startswith("text_encoder."):
        rest = key[len("text_encoder.") :]
        m = _TEXT_ADAPTER.fullmatch(rest)
        if m:  # after the dense layer, before its residual LayerNorm: adapter_position=output
            rest = f"{m[1]}.dense.adapter.{m[2]}.{m[3]}"
        return "text.trunk." + rest
    return key


def _value(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if key == "temp":  # logits = s / temp = exp(logit_scale) * s
        return torch.log(1 / tensor.detach().float().reshape(1))
    return tensor


def _list(names, n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _hints(state: dict, config: dict | None, unexpected, missing, shapes) -> list[str]:
    hints = []
    if any(_VISION_ADAPTER.search(k) for k in unexpected):
        hints.append(
            "the checkpoint has the original's ViT adapters: add adapters to model.vision.unlock with "
            "model.vision.adapter_position=branch_input (conventional_adapter.insert=True does both)"
        )
    if any(_TEXT_ADAPTER.search(k) for k in unexpected):
        hints.append(
            "the checkpoint has the original's BERT adapters: add adapters to model.text.unlock "
            "(conventional_adapter.insert=True)"
        )
    if any(".adapter." in k for k, _, _ in shapes):
        hints.append(
            "adapter widths differ: set model.<tower>.adapter_reduction "
            "(conventional_adapter.reduction_factor) to the original's"
        )
    size = native_size(state)
    if any(k == "visual_encoder.pos_embed" and a[1] != b[1] for k, a, b in shapes) and size:
        hints.append(f"the checkpoint was trained at {size} px: set model.image_size={size}")
    embed = next((a[0] for k, a, b in shapes if k in ("vision_proj.weight", "text_proj.weight") and a[0] != b[0]), None)
    if embed is not None:
        hints.append(f"its embedding has {embed} dimensions: set model.embed_dim={embed}")
    if config and (missing or unexpected or shapes):
        named = [
            f"{k}={config[k]}" for k in ("vision_encoder", "text_encoder", "image_res", "embed_dim") if k in config
        ]
        adapter = config.get("conventional_adapter") or {}
        if adapter.get("insert"):
            named.append(
                f"conventional_adapter.insert={adapter['insert']} "
                f"conventional_adapter.reduction_factor={adapter.get('reduction_factor')}"
            )
        if named:
            hints.append("the checkpoint's own config says " + " ".join(named))
    return hints


def match_state(spec: str, model) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's names (shapes checked), or a ConfigError naming every
    key that has no place, every model tensor the checkpoint lacks and every shape that differs.

    Works on a model built on the meta device (the config check) as on a real one."""
    checkpoint = read_checkpoint(spec)
    state = checkpoint["model"]
    targets = model.state_dict(keep_vars=True)
    # peft's LoRA moves a wrapped Linear's own weight under .base_layer
    aliases = {k.replace(".base_layer.", "."): k for k in targets if ".base_layer." in k}
    mapped, unexpected, shapes = {}, [], []
    for key, tensor in state.items():
        name = our_name(key)
        if name is None:
            continue
        name = aliases.get(name, name)
        if name not in targets:
            unexpected.append(key)
            continue
        value = _value(key, tensor)
        if tuple(value.shape) != tuple(targets[name].shape):
            shapes.append((key, tuple(value.shape), tuple(targets[name].shape)))
            mapped[name] = None  # present, but unusable
            continue
        mapped[name] = value
    missing = [k for k in targets if k not in mapped and k not in _ZEROED and not _NEW.fullmatch(k)]
    if unexpected or missing or shapes:
        problems = []
        if unexpected:
            problems.append(
                f"{len(unexpected)} of its tensors have no place in the model the config builds ({_list(unexpected)})"
            )
        if missing:
            problems.append(f"{len(missing)} of the model's tensors are not in it ({_list(missing)})")
        if shapes:
            problems.append(
                "shapes differ: "
                + "; ".join(f"{k} {a} vs {b}" for k, a, b in shapes[:4])
                + (f" and {len(shapes) - 4} more" if len(shapes) > 4 else "")
            )
        hints = _hints(state, checkpoint["config"], unexpected, missing, shapes)
        raise ConfigError(
            f"model.init_from=lilt:{spec} does not fit the model.* config: "
            + "; ".join(problems)
            + "."
            + "".join(f" Hint: {h}." for h in hints)
        )
    return mapped


def load_weights(model, spec: str, model_cfg) -> None:
    """Copy the checkpoint into ``model`` (after the unlocks added any adapters or LoRA)."""
    mapped = match_state(spec, model)
    with torch.no_grad():
        targets = model.state_dict(keep_vars=True)
        for name, value in mapped.items():
            targets[name].copy_(value)
        for name in _ZEROED:
            if name in targets:
                targets[name].zero_()
