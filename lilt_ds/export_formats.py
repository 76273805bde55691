"""Hand a model started from a pretrained pair back to its ecosystem: an OpenCLIP model folder or a
Hugging Face model folder, loadable without lilt_ds, with a model card.

    python launch/export.py --checkpoint outputs/run --format open_clip --out exported/  (init_from=open_clip:...)
    python launch/export.py --checkpoint outputs/run --format hf --out exported/          (model.init_from=hf:...)

LoRA is merged into the weights it adapts (exact). Houlsby adapters are a nonlinear bottleneck after
a linear, so no weight of the pair's architecture can hold them: such a model is refused by name
(its lilt_ds export, ``--format lilt_ds``, keeps them).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from .errors import ConfigError
from .models.sources import parse_init_from
from .models.summary import trainable_summary

FORMATS = ("lilt_ds", "open_clip", "hf")
SOURCE_FORMAT = {"open_clip": "open_clip", "hf": "hf"}  # init_from prefix -> the format its pair is written in


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA (peft's wrapped Linears, and the weight parametrizations of packed attention)
    into its base weight and drop the LoRA modules, so the names are the pair's own again."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: no peft LoRA either
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())
    return model


def _refuse_adapters(model: nn.Module, fmt: str) -> None:
    hosts = [name for name, m in model.named_modules() if hasattr(m, "adapter") and isinstance(m.adapter, nn.Module)]
    if hosts:
        raise ConfigError(
            f"--format {fmt}: the model has {len(hosts)} bottleneck adapters (after {hosts[0]}, ...), which "
            f"cannot be merged into any weight of the {fmt} architecture, so that format would lose them. Export it "
            "with --format lilt_ds (load it with lilt_ds.export.load_exported), or train with unlock items that "
            "merge: ln, bitfit, attn, mlp, top_k:K, lora"
        )


def _fit_to(state: dict, reference: dict, fmt: str) -> dict:
    """``state`` reshaped to ``reference``'s shapes (scalars are [1] here, [] there), refusing any mismatch."""
    missing, unexpected = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or unexpected:
        raise ConfigError(
            f"--format {fmt}: the weights do not map onto the architecture: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    out = {}
    for key, ref in reference.items():
        value = state[key]
        if value.numel() != ref.numel():
            raise ConfigError(
                f"--format {fmt}: {key} has shape {tuple(value.shape)}, the architecture {tuple(ref.shape)}"
            )
        out[key] = value.reshape(ref.shape).to(ref.dtype).contiguous()
    return out


# ------------------------------------------------------------------------------------- OpenCLIP
def _write_open_clip(model, cfg, out: str) -> None:
    import open_clip
    from safetensors.torch import save_file

    from .models.sources import open_clip as source

    spec = parse_init_from(cfg.model.init_from)[1]
    config = source.model_config(spec, download=True)  # hf-hub: in the hub cache since the model was built
    vision = model.vision
    config = {
        "model_cfg": config["model_cfg"],
        "preprocess_cfg": {
            **(config.get("preprocess_cfg") or {}),
            "mean": list(vision.mean),
            "std": list(vision.std),
            "interpolation": vision.interpolation,
            "size": vision.image_size,
        },
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, source.CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    reference = open_clip.create_model("local-dir:" + out, load_weights=False).state_dict()
    state = _fit_to(source.state_for_open_clip(model, model.pair), reference, "open_clip")
    save_file(state, os.path.join(out, "open_clip_model.safetensors"))
    folder = source.local_dir(spec)
    if folder is not None:  # a tokenizer the folder carries (OpenCLIP's HF tokenizers) travels with it
        for name in os.listdir(folder):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(os.path.join(folder, name), out)


# -------------------------------------------------------------------------------- Hugging Face
def _write_hf(model, cfg, out: str) -> None:
    from transformers import AutoConfig, AutoModel, CLIPImageProcessor, SiglipImageProcessor

    from .models.sources import hf as source

    spec = parse_init_from(cfg.model.init_from)[1]
    config = AutoConfig.from_pretrained(source.model_source(spec))
    reference = AutoModel.from_config(config)
    state = _fit_to(source.state_for_hf(model, model.pair), reference.state_dict(), "hf")
    reference.load_state_dict(state, strict=True)
    reference.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source.model_source(spec)).save_pretrained(out)
    vision = model.vision
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3}[vision.interpolation]
    size = vision.image_size
    if model.pair["siglip"]:
        processor = SiglipImageProcessor(
            size={"height": size, "width": size},
            resample=resample,
            image_mean=list(vision.mean),
            image_std=list(vision.std),
        )
    else:
        processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            resample=resample,
            image_mean=list(vision.mean),
            image_std=list(vision.std),
        )
    processor.save_pretrained(out)


WRITERS = {"open_clip": _write_open_clip, "hf": _write_hf}


def _final_metrics(run_dir: str | None) -> dict | None:
    path = os.path.join(run_dir, "results.jsonl") if run_dir else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else None


def model_card(cfg, counts: dict, fmt: str, metrics: dict | None) -> str:
    """README.md of an exported folder: base pair, mode, what trained (``counts``: trainable_summary's
    total, taken before LoRA was merged), data, final metrics, how to load."""
    init_from = cfg.model.init_from
    source = cfg.data.train_files or cfg.data.train_shards or "the built-in demo data (lilt_ds)"
    base = parse_init_from(init_from)[1]
    hub_base = (
        base[len("hf-hub:") :]
        if base.startswith("hf-hub:")
        else (base if "/" in base and not base.startswith(("/", ".", "~", "local-dir:")) else None)
    )
    lines = [
        "---",
        f"library_name: {'open_clip' if fmt == 'open_clip' else 'transformers'}",
        "tags: [clip, zero-shot-image-classification, lilt_ds]",
    ]
    if hub_base:
        lines.append(f"base_model: {hub_base}")
    lines += [
        "---",
        "",
        f"# Contrastive image-text model from `{init_from}`",
        "",
        f"Trained with lilt_ds, mode `{cfg.mode}`: vision unlock `{cfg.model.vision.unlock}`, "
        f"text unlock `{cfg.model.text.unlock}` (a locked tower trains only its unlock set; "
        "LoRA is merged into the weights here).",
        "",
        f"- trainable parameters: {counts['trainable']:,} of {counts['total']:,}",
        f"- training data: {source}",
        f"- epochs: {cfg.train.epochs}, max steps: {cfg.train.max_steps}, lr {cfg.train.lr}, loss `{cfg.loss.type}`",
        "",
    ]
    if metrics:
        lines += ["## Final evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    else:
        lines += ["No evaluation was recorded for this run.", ""]
    lines += ["## Load", "", "```python"]
    if fmt == "open_clip":
        lines += [
            "import open_clip",
            'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:THIS_FOLDER")',
            'tokenizer = open_clip.get_tokenizer("local-dir:THIS_FOLDER")',
        ]
    else:
        lines += [
            "from transformers import AutoModel, AutoProcessor, pipeline",
            'model = AutoModel.from_pretrained("THIS_FOLDER")',
            'classifier = pipeline("zero-shot-image-classification", model="THIS_FOLDER")',
        ]
    lines += ["```", ""]
    return "\n".join(lines)


def export_pretrained_format(source: str, out: str, fmt: str) -> str:
    """Write the trained model of ``source`` (run folder, checkpoint or lilt_ds export) as ``fmt``'s folder."""
    from .export import load_trained

    if fmt not in WRITERS:
        raise ConfigError(f"--format {fmt!r}: choose {', '.join(FORMATS)}")
    model, cfg = load_trained(source)
    parsed = parse_init_from(cfg.model.init_from)
    if parsed is None or parsed[0] not in SOURCE_FORMAT:
        raise ConfigError(
            f"--format {fmt}: {source} was not started from a pretrained pair (model.init_from is "
            f"{cfg.model.init_from!r}); its towers have no {fmt} architecture. Use --format lilt_ds"
        )
    if SOURCE_FORMAT[parsed[0]] != fmt:
        raise ConfigError(
            f"--format {fmt}: {source} started from {cfg.model.init_from}, whose architecture is "
            f"written as --format {SOURCE_FORMAT[parsed[0]]}; converting between the two is not supported"
        )
    _refuse_adapters(model, fmt)
    counts = trainable_summary(model)["total"]
    model = merge_lora(model).float().eval()
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"--out {out} exists and is not empty: choose a new folder")
    with torch.no_grad():
        WRITERS[fmt](model, cfg, out)
    run_dir = None
    if os.path.isdir(source):
        from .checkpoint import resolve_checkpoint

        root = resolve_checkpoint(source)[0]
        run_dir = os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(cfg, counts, fmt, _final_metrics(run_dir)))
    return out
