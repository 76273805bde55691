"""The experiment config's schema: one typed, frozen dataclass per section, each field with its
default, its type (``Literal`` for choices), a one-line help and its own check.

The dataclasses are the one list of keys: the defaults a preset starts from, the keys an override
may name, the checks :func:`parse` runs on each value, ``configs/_base.yaml`` and the configuration
reference (both generated: ``python -m lilt_ds.schema``). Checks that need another layer (a timm
name, a loss type of the registry, a file that must exist) and checks that span sections run after
parsing, in :mod:`lilt_ds.config`. A field is read as a typed attribute (``cfg.train.lr``); a
resolved value is a new config (:func:`replace_keys`), never an assignment.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import ConfigError


# ---------------------------------------------------------------------------------- value rules
class Rule:
    """What one value accepts: ``check`` returns it (normalised) or raises ConfigError naming the key."""

    text = "a value"

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def normalise(self, value):
        return value

    def check(self, key: str, value):
        if not self.accepts(value):
            raise ConfigError(f"{key} = {value!r}: expected {self.text}")
        return self.normalise(value)


class Int(Rule):
    def __init__(self, minimum: int | None = None):
        self.minimum = minimum
        self.text = "an integer" + ("" if minimum is None else f" >= {minimum}")

    def accepts(self, value) -> bool:
        return (
            isinstance(value, int) and not isinstance(value, bool) and (self.minimum is None or value >= self.minimum)
        )


class Number(Rule):
    def __init__(
        self,
        minimum: float | None = None,
        positive: bool = False,
        below: float | None = None,
        maximum: float | None = None,
    ):
        self.minimum, self.positive, self.below, self.maximum = minimum, positive, below, maximum
        bounds = ["> 0"] if positive else ([f">= {minimum:g}"] if minimum is not None else [])
        bounds += [f"< {below:g}"] if below is not None else []
        bounds += [f"<= {maximum:g}"] if maximum is not None else []
        self.text = "a number" + (" " + " and ".join(bounds) if bounds else "")

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (
            (not self.positive or value > 0)
            and (self.minimum is None or value >= self.minimum)
            and (self.below is None or value < self.below)
            and (self.maximum is None or value <= self.maximum)
        )

    def normalise(self, value):
        return float(value)


class OneOf(Rule):
    def __init__(self, *choices):
        self.choices = choices
        self.text = "one of " + ", ".join(str(c) for c in choices)

    def accepts(self, value) -> bool:
        return not isinstance(value, (bool, list, dict)) and value in self.choices


class Bool(Rule):
    text = "true or false"

    def accepts(self, value) -> bool:
        return isinstance(value, bool)


class Str(Rule):
    text = "a non-empty string"

    def accepts(self, value) -> bool:
        return isinstance(value, str) and bool(value)


class Pattern(Rule):
    text = "a regular expression (Python re)"

    def accepts(self, value) -> bool:
        try:
            re.compile(value)
        except (re.error, TypeError):
            return False
        return isinstance(value, str) and bool(value)


class IsFalse(Rule):
    text = "false"

    def accepts(self, value) -> bool:
        return value is False


class SignalName(Rule):
    """A signal a process can catch, by name (SIGTERM, TERM, SIGUSR1, USR1): normalised to SIGTERM."""

    text = "a signal name (SIGTERM, SIGUSR1, ...; not SIGKILL or SIGSTOP, which no process can catch)"

    def accepts(self, value) -> bool:
        import signal

        if not isinstance(value, str):
            return False
        name = "SIG" + value.upper().removeprefix("SIG")
        return name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP")

    def normalise(self, value):
        return "SIG" + value.upper().removeprefix("SIG")


class AnyMapping(Rule):
    text = "a mapping"

    def accepts(self, value) -> bool:
        return isinstance(value, Mapping)

    def normalise(self, value):
        return dict(value)


class Nullable(Rule):
    def __init__(self, rule: Rule):
        self.rule, self.text = rule, f"{rule.text}, or null"

    def accepts(self, value) -> bool:
        return value is None or self.rule.accepts(value)

    def normalise(self, value):
        return None if value is None else self.rule.normalise(value)


class Either(Rule):
    def __init__(self, *rules: Rule, text: str | None = None):
        self.rules = rules
        self.text = text or " or ".join(rule.text for rule in rules)

    def accepts(self, value) -> bool:
        return any(rule.accepts(value) for rule in self.rules)

    def normalise(self, value):
        return next(rule for rule in self.rules if rule.accepts(value)).normalise(value)


class ListOf(Rule):
    def __init__(self, rule: Rule, min_items: int = 0):
        self.rule, self.min_items = rule, min_items
        items = rule.text.split(" ", 1)[1] if rule.text.startswith(("a ", "an ")) else rule.text
        noun_end = min([items.find(mark) for mark in (" (", " >", " <") if mark in items] or [len(items)])
        self.text = ("a non-empty list" if min_items else "a list") + f" of {items[:noun_end]}s{items[noun_end:]}"

    def accepts(self, value) -> bool:
        return (
            isinstance(value, (list, tuple))
            and len(value) >= self.min_items
            and all(self.rule.accepts(v) for v in value)
        )

    def normalise(self, value):
        return [self.rule.normalise(v) for v in value]


# ---------------------------------------------------------------------------------- fields
def setting(
    default: Any,
    help: str,
    *,
    expect: str | None = None,
    minimum: float | None = None,
    positive: bool = False,
    below: float | None = None,
    maximum: float | None = None,
    rule: Rule | None = None,
    convert: Callable[[Any], Any] | None = None,
):
    """A config field: its default and help; its check is derived from its type with these bounds
    (``rule`` replaces the derived one; ``convert`` turns a convenient spelling into the typed form
    first, as a single path into a list; ``expect`` words what the check accepts)."""
    metadata = {
        "help": help,
        "expect": expect,
        "bounds": dict(minimum=minimum, positive=positive, below=below, maximum=maximum),
        "rule": rule,
        "convert": convert,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, help: str):
    """A nested section (its own dataclass), default: all of its defaults."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


def internal(default: Any, help: str):
    """A field the program keeps beside the user's keys (not in ``_base.yaml``, not an override)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, "internal": True})
    return field(default=default, metadata={"help": help, "internal": True})


def _as_list(value):
    """A single string where a list is expected means a list of one; null means an empty list."""
    return [value] if isinstance(value, str) else ([] if value is None else value)


def _as_list_or_none(value):
    return [value] if isinstance(value, str) else value


# ---------------------------------------------------------------------------------- the sections
@dataclass(frozen=True)
class LoraSettings:
    """peft's LoRA on the tower's attention (and, by pattern, other) linear layers."""

    rank: int = setting(8, "LoRA rank r", minimum=1)
    alpha: float = setting(16.0, "LoRA scaling alpha (the update is scaled by alpha / r)", positive=True)
    dropout: float = setting(0.0, "dropout on the LoRA branch's input", minimum=0.0, below=1.0)
    target_modules: str | list[str] | None = setting(
        None,
        "module name pattern(s) LoRA wraps; null: the tower's attention projections",
        expect="a module name pattern or a list of them, or null",
    )


@dataclass(frozen=True)
class TowerSettings:
    """What the two towers share."""

    name: str = setting("base", "the tower")
    pretrained: bool | str = setting(True, "where the weights come from", expect="true, false or a weights source")
    unlock: list[str] = setting(
        [], "what trains in a locked tower: ln, bitfit, adapters, attn, mlp, top_k:K, lora", convert=_as_list
    )
    adapter_reduction: int = setting(4, "bottleneck adapters: the tower's width divided by this", minimum=1)
    adapter_position: Literal["output", "branch_input"] = setting(
        "output",
        "output (Houlsby: after the attention/MLP output projection) | branch_input (before "
        "norm1/norm2, the residual untouched: the original LilT's ViT)",
    )
    lora: LoraSettings = section(LoraSettings, "LoRA of unlock: [lora]")
    grad_checkpointing: bool = setting(False, "activation checkpointing of the tower's blocks (a tower that trains)")
    layer_decay: float | None = setting(
        None,
        "layer-wise lr decay (EVA-CLIP --visual-ld/--text-ld): block i gets lr x ld^(depth - i); null = off",
        positive=True,
        maximum=1.0,
    )


@dataclass(frozen=True)
class VisionSettings(TowerSettings):
    name: str = setting("base", "tiny|small|base|large (DeiT/ViT patch 16) or any timm model name")
    pretrained: bool | str = setting(
        True,
        "true (timm's default weights) | false | hf-hub:ORG/NAME | local-dir:DIR | FILE.pth/.safetensors | pkg:PACKAGE",
        expect="true, false or a weights source",
    )
    patch_dropout: float = setting(
        0.0,
        "ViTs: fraction of patch tokens each training sample drops (FLIP, "
        "OpenCLIP's patch_dropout); evaluation keeps all",
        minimum=0.0,
        maximum=0.9,
    )


@dataclass(frozen=True)
class TextSettings(TowerSettings):
    name: str = setting("base", "tiny|small|base|large (BERT) or a Hugging Face model name or folder")
    pretrained: bool | str = setting(
        True,
        "true (the preset's hub weights, or `name`) | false | hub name | local folder | pkg:PACKAGE",
        expect="true, false or a weights source",
    )
    adapter_position: Literal["output", "branch_input"] = setting(
        "output", "BERT is post-norm: output only (the original LilT's place too)"
    )
    tokenizer: str | None = setting(None, "null -> from the weights' source")
    pooling: Literal["cls", "mean"] = setting("cls", "the sentence embedding: the [CLS] token or the mean of tokens")


@dataclass(frozen=True)
class ModelSettings:
    init_from: str | None = setting(
        None,
        "start from one pretrained pair: open_clip:ARCH | hf:NAME_OR_FOLDER; or from an original LilT run: "
        "lilt:checkpoint_XX.pth",
    )
    init_weights: str | None = setting(
        None, "open_clip: a pretrained tag, a weights file (null: the folder's / hub's weights, random for a bare ARCH)"
    )
    embed_dim: int = setting(256, "the shared embedding's width (a pair keeps its own)", minimum=1)
    image_size: int | None = setting(
        None,
        "null -> 256 for timm towers (the paper's), the pair's (or lilt: checkpoint's) own size with model.init_from",
        minimum=8,
    )
    freeze_projections: bool = setting(False, "the two projections keep their initial weights")
    freeze_logit_scale: bool = setting(False, "the temperature keeps its initial value")
    init_logit_scale: float | None = setting(None, "log of the logit multiplier; null -> ln(1/0.07) (ln 10 for siglip)")
    init_logit_bias: float | None = setting(None, "null -> none (-10 for siglip)")
    vision: VisionSettings = section(VisionSettings, "the image tower")
    text: TextSettings = section(TextSettings, "the text tower")


@dataclass(frozen=True)
class MemorySettings:
    frozen_recompute: bool = setting(
        False,
        "frozen MLPs/attention of a lilt tower keep only their input (lilt_ds.models.recompute): fewer "
        "activations for more step time; ZeRO 0-2 only",
    )


@dataclass(frozen=True)
class LossSettings:
    type: str = setting("clip", "clip | siglip | chunked | fused (lilt_ds.losses.LOSS_REGISTRY)")
    local_loss: bool = setting(
        True, "each rank computes its rows' loss against the gathered batch (OpenCLIP's --local-loss)"
    )
    gather_with_grad: bool = setting(True, "gradients flow through the feature gather (OpenCLIP's --gather-with-grad)")
    chunk_size: int = setting(4096, "chunked, fused and siglip: rows x columns of one block of logits", minimum=1)
    tile_rows: int | None = setting(
        None, "fused: rows of one tile of dot products; null = the kernel's default", minimum=1
    )
    tile_cols: int | None = setting(
        None, "(C++ CPU kernel 256 x 256; Triton rounds to a power of two in 16..128, default 64 x 64)", minimum=1
    )


@dataclass(frozen=True)
class AugmentSettings:
    """The training images' augmentation; null = the preset's value (resolved when the config loads)."""

    preset: Literal["lilt", "openclip", "none"] = setting(
        "lilt", "lilt (the original recipe) | openclip (its default: mild crop only) | none (the eval resize)"
    )
    scale: list[float] | None = setting(
        None,
        "RandomResizedCrop area range [low, high]: lilt [0.2, 1.0], openclip [0.9, 1.0]",
        expect="[low, high], or null",
        rule=Nullable(ListOf(Number())),
    )
    ratio: list[float] | None = setting(
        None, "its aspect-ratio range: [0.75, 1.333]", expect="[low, high], or null", rule=Nullable(ListOf(Number()))
    )
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = setting(
        None, "bicubic | bilinear | nearest: bicubic"
    )
    hflip: bool | None = setting(None, "random horizontal flip: lilt true, openclip/none false")
    randaugment: str | bool | None = setting(
        None,
        'a timm RandAugment string or false: lilt "rand-m7-n2", openclip/none false',
        expect='a timm RandAugment string such as "rand-m7-n2", or false (off)',
        rule=Nullable(Either(Str(), IsFalse())),
    )
    color_jitter: float | list[float] | None = setting(
        None,
        "strength s (brightness, contrast, saturation) or [b, c, s, h]: 0 (off)",
        expect="a number, [brightness, contrast, saturation, hue], or null",
    )
    grayscale: float | None = setting(None, "probability of a grey image: 0 (off)", minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class DemoSettings:
    """The built-in demo dataset (coloured shapes with compositional captions)."""

    n: int = setting(5000, "training images", minimum=1)
    eval_n: int = setting(500, "held-out retrieval images", minimum=1)
    seed: int = setting(0, "the generator's seed", minimum=0)
    size: int = setting(128, "image side in pixels", minimum=16)


@dataclass(frozen=True)
class TableSettings:
    """Columns of CSV/TSV, Parquet and datasets tables in data.train_files (OpenCLIP's --csv-* flags)."""

    image_key: str = setting("filepath", "the column of image paths (OpenCLIP's --csv-img-key)")
    caption_key: str = setting("title", "the column of captions, a string or a list of them (--csv-caption-key)")
    separator: str | None = setting(
        None, "CSV/TSV field separator (--csv-separator); null: tab for .tsv, comma for .csv", expect="a string or null"
    )


@dataclass(frozen=True)
class DataSettings:
    train_files: list[str] = setting(
        [],
        "JSON files in the original format, or tables: .csv/.tsv, .parquet, datasets folders (save_to_disk); "
        "empty (and no shards) -> the built-in demo data",
        expect="a list of JSON, CSV/TSV or Parquet files or datasets folders (empty for the built-in demo)",
        convert=_as_list,
        rule=ListOf(Str()),
    )
    train_shards: str | list[str] | None = setting(
        None,
        'tar shards (WebDataset layout) instead: "/d/{00000..00099}.tar", '
        '"pipe:aws s3 cp s3://b/{00000..00099}.tar -", "https://host/{00000..00099}.tar", '
        '"s3://b/{00000..00099}.tar" (any fsspec URL), or a list',
        expect='a brace pattern such as "/data/{00000..00099}.tar" (a path, pipe:COMMAND or URL), a list, a list '
        "of {urls: PATTERN, weight: W} sources, or null",
        convert=_as_list_or_none,
        rule=Nullable(ListOf(Either(Str(), AnyMapping()), min_items=1)),
    )
    resampled: bool = setting(
        False,
        "shards: draw them with replacement, an endless stream cut into epochs of samples_per_epoch (OpenCLIP's "
        "--dataset-resampled); needed for a weighted mixture: train_shards: [{urls: PATTERN, weight: 3}, ...]",
    )
    samples_per_epoch: int | None = setting(
        None,
        "shards: the samples in all the shards, for shards without a sizes.json or img2dataset _stats.json "
        "(pipe: and remote shards often); with resampled: the samples of an epoch; null: the counted total",
        minimum=1,
    )
    shard_retries: int = setting(
        3, "shards: a remote or pipe: shard whose read fails is opened again this many times, with backoff", minimum=0
    )
    shard_timeout_s: float = setting(
        60.0, "shards: seconds a remote or pipe: read may wait for data before it fails (and is retried)", positive=True
    )
    table: TableSettings = section(TableSettings, "the columns of CSV/TSV, Parquet and datasets tables in train_files")
    shuffle_buffer: int = setting(
        1000, "shards: samples each DataLoader worker mixes across its shards (0: off)", minimum=0
    )
    index_cache: str | None = setting(
        "auto",
        "JSON index cache: auto (beside the JSON, else $LILT_DS_CACHE/caption-index) | a folder | null",
        expect="auto, a folder, or null (no cache)",
    )
    cache_locked_features: bool = setting(
        False, "a fully locked image tower's features computed once, read every later epoch (train_files)"
    )
    cache_views: int = setting(
        1, "cached views per image; epoch e reads view e mod K; 1: the eval resize, K > 1: K augmented views", minimum=1
    )
    image_root: str | dict | None = setting(
        None,
        'null | "/root" | {from: "/old", to: "/new"}',
        expect='a folder, {from: "/old", to: "/new"}, or null',
        rule=Nullable(Either(Str(), AnyMapping())),
    )
    eval_file: str | None = setting(
        None, "retrieval JSON; null with demo data -> the demo eval split", expect="a path or null"
    )
    eval_image_root: str | dict | None = setting(
        None,
        "as image_root, for eval_file",
        expect='a folder, {from: "/old", to: "/new"}, or null',
        rule=Nullable(Either(Str(), AnyMapping())),
    )
    on_bad_sample: Literal["error", "skip"] = setting(
        "error", "an unreadable entry stops the run, or is replaced and counted"
    )
    max_bad_fraction: float = setting(0.01, "skip: the share of bad entries a run tolerates", minimum=0.0, maximum=1.0)
    clean_captions: bool | None = setting(
        None,
        "the original's caption cleaning (lower case, punctuation stripped); null: on, but off for a pretrained "
        "pair (model.init_from), whose tokenizer expects raw text",
    )
    max_words: int = setting(30, "captions are cut to this many words", minimum=1)
    max_length: int | None = setting(
        None, "tokens of a training caption; null: 25 (the original's), a pair's context length", minimum=1
    )
    eval_max_length: int | None = setting(
        None, "tokens of an evaluation caption; null: 30 (the original's), a pair's context length", minimum=1
    )
    augment: AugmentSettings = section(AugmentSettings, "the training images' augmentation; null = the preset's value")
    num_workers: Literal["auto"] | int = setting(
        "auto",
        "DataLoader workers per rank: auto = 2 on the CPU; on a GPU the CPUs per local rank less one, at most 8",
        expect="auto or an integer >= 0",
        rule=Either(OneOf("auto"), Int(0)),
    )
    pin_memory: Literal["auto"] | bool = setting(
        "auto", "auto = pinned host memory on a GPU (asynchronous copies), off on the CPU", expect="auto, true or false"
    )
    persistent_workers: bool = setting(True, "DataLoader workers live across epochs")
    decode: Literal["cpu", "device"] = setting(
        "cpu",
        "where training JPEGs decode: cpu (the workers, at a reduced scale when the crop allows) | device "
        "(nvJPEG on the GPU, batched, with the crop and flip there; other formats stay on the CPU)",
    )
    demo: DemoSettings = section(DemoSettings, "the built-in demo data")


def _regex_list() -> Rule:
    return ListOf(Pattern())


@dataclass(frozen=True)
class LrScale:
    """Per-tower learning-rate factors (EVA-CLIP --visual-lr/--text-lr)."""

    vision: float = setting(1.0, "the image tower's factor", positive=True)
    text: float = setting(1.0, "the text tower's factor", positive=True)
    heads: float = setting(1.0, "projections, logit scale (and bias)", positive=True)


@dataclass(frozen=True)
class EarlyStoppingSettings:
    """End the run when a held-out metric has not improved for ``patience`` evaluations."""

    metric: str | None = setting(
        None, "an evaluation metric of results.jsonl (higher is better): r_mean, txt_r1, zeroshot_top1, ...; null: off"
    )
    patience: int = setting(3, "evaluations without improvement before the run ends", minimum=1)
    min_delta: float = setting(0.0, "an improvement smaller than this (points) does not count", minimum=0.0)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = setting(15, "passes over the training data", minimum=1)
    max_steps: int | None = setting(None, "stop early after this many optimizer steps", minimum=1)
    micro_batch_size: int = setting(128, "per GPU", minimum=1)
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", minimum=1)
    exact_accumulation: bool = setting(False, "re-encode micro-batches against cached features (OpenCLIP accum_freq)")
    lr: float = setting(1.0e-4, "peak learning rate", positive=True)
    min_lr: float = setting(1.0e-5, "the schedule's end", minimum=0.0)
    lr_scale: LrScale = section(
        LrScale, "per-tower lr factors (EVA-CLIP --visual-lr/--text-lr); heads: projections, logit scale"
    )
    weight_decay: float = setting(0.02, "AdamW's decoupled weight decay", minimum=0.0)
    no_weight_decay: list[str] = setting(
        [], "regexes of parameter names kept out of weight decay, besides biases, norms and scalars", rule=_regex_list()
    )
    schedule: Literal["cosine", "constant", "constant_cooldown"] = setting(
        "cosine", "cosine (warmup, cosine to min_lr) | constant (warmup, then lr) | constant_cooldown"
    )
    cooldown_fraction: float = setting(
        0.2, "constant_cooldown: the last fraction of the steps decays linearly to min_lr", positive=True, maximum=1.0
    )
    warmup_steps: int = setting(1000, "linear warmup from 0", minimum=0)
    grad_clip: float = setting(1.0, "global gradient norm clip (0: off)", minimum=0.0)
    log_every: int = setting(50, "optimizer steps between log lines", minimum=1)
    max_nonfinite_steps: int = setting(
        5, "non-finite losses in a row (each step skipped) before the run stops", minimum=1
    )
    deterministic: bool = setting(
        False, "torch deterministic algorithms, deterministic cuDNN/cuBLAS (GPU runs repeat bit for bit; slower)"
    )
    compile: bool | str = setting(
        False,
        "torch.compile both towers (timm's --torchcompile): true (inductor) | a backend name | false; ZeRO 0-2",
        expect="true, false or a torch.compile backend name",
    )
    stop_signals: list[str] = setting(
        ["SIGTERM", "SIGUSR1"],
        "signals that stop every rank at the next step boundary with a checkpoint, exit status 75 (a scheduler's "
        "preemption notice: SLURM's --signal, a requeue)",
        rule=ListOf(SignalName()),
    )
    collective_timeout_s: float = setting(
        1800.0,
        "seconds a collective waits for the other ranks before the run ends with an error (a dead or hung rank)",
        positive=True,
    )
    early_stopping: EarlyStoppingSettings = section(
        EarlyStoppingSettings,
        "end a run whose held-out metric stopped improving (Hugging Face's EarlyStoppingCallback)",
    )


@dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int | None = setting(None, "a checkpoint every this many steps (and at the end of the run)", minimum=1)
    save_last_only: bool = setting(False, "keep only the newest checkpoint (keep_last: 1; the original LilT's flag)")
    keep_last: int | None = setting(
        None, "once a save completes, remove all but the newest K complete checkpoints; null keeps all", minimum=1
    )
    keep_best: str | None = setting(
        None,
        "keep the checkpoint with the best value of this evaluation metric (r_mean, txt_r1, zeroshot_top1, ...) "
        "beside the newest, as checkpoints/best (keep_last never removes it); null: off",
    )


@dataclass(frozen=True)
class ClassificationSettings:
    """Zero-shot classification during training (OpenCLIP --zeroshot-frequency)."""

    data: str | None = setting(
        None, "a folder with one sub-folder per class, CIFAR's pickles, or a JSON list of {image, label}; null = off"
    )
    image_root: str | None = setting(None, "JSON with relative image paths: their folder")
    classnames: str | None = setting(
        None,
        "a file of class names, one per line (JSON with integer labels; replaces folder names), or imagenet: "
        "ImageNet's 1,000 synset folders named as OpenAI's CLIP named them",
    )
    templates: str = setting(
        "a photo of a {}.", "one template, a file of them, imagenet (CLIP's 80) or cifar (CLIP's 18)"
    )
    every_epochs: int = setting(1, "and after the last epoch; 0 = never", minimum=0)


@dataclass(frozen=True)
class EvalSettings:
    every_epochs: int = setting(
        1, "retrieval on the eval split every this many epochs (and after the last); 0 = never", minimum=0
    )
    every_steps: int | None = setting(
        None,
        "also every this many optimizer steps (a stream of resampled shards has no natural epoch); null: by epoch",
        minimum=1,
    )
    batch_size: int = setting(128, "images per forward pass", minimum=1)
    preprocess: Literal["auto", "source", "square"] = setting(
        "auto",
        "evaluation images: source (as the model's source evaluates: OpenCLIP's preprocess, the HF image "
        "processor, timm's data config) | square (the original LilT resize) | auto: source for a pretrained "
        "pair, square for timm towers",
    )
    classification: ClassificationSettings = section(
        ClassificationSettings, "zero-shot classification during training (OpenCLIP --zeroshot-frequency)"
    )


@dataclass(frozen=True)
class LoggingSettings:
    disable_wandb: bool = setting(True, "no Weights & Biases run")
    wandb_project: str = setting("lilt_ds", "its project")
    wandb_run_name: str | None = setting(None, "its run name; null: wandb's")
    data_wait_warning: float = setting(
        0.2,
        "warn once when the steps wait for the loader more than this share of their time (0: never)",
        minimum=0.0,
        maximum=1.0,
    )
    tensorboard: bool = setting(
        False, "rank 0 writes the log's scalars as TensorBoard events in OUTPUT_DIR/tensorboard (the tensorboard extra)"
    )


@dataclass(frozen=True)
class ExperimentConfig:
    """Every valid key of an experiment config with its default. Presets override a subset;
    ``--overrides key=value`` changes one, ``+key=value`` adds one the schema lacks (kept in
    ``extras``, saved with the run, never read by lilt_ds)."""

    mode: Literal["clip", "lit", "lilt"] = setting(
        "lilt", "clip | lit | lilt (docs/architecture.md): which towers are locked"
    )
    seed: int = setting(42, "seeds the towers' initialisation, the data order and augmentation", minimum=0)
    output_dir: str | None = setting(None, "null -> outputs/<config>-<timestamp>")
    model: ModelSettings = section(ModelSettings, "the towers, the projections and the temperature")
    memory: MemorySettings = section(MemorySettings, "memory savings that cost time")
    loss: LossSettings = section(LossSettings, "the contrastive loss")
    data: DataSettings = section(DataSettings, "training and evaluation data")
    train: TrainSettings = section(TrainSettings, "the optimisation")
    checkpoint: CheckpointSettings = section(CheckpointSettings, "checkpoints")
    eval: EvalSettings = section(EvalSettings, "evaluation during training")
    logging: LoggingSettings = section(LoggingSettings, "logging")
    config_name: str = internal("custom", "the preset or file the config came from")
    extras: dict = internal({}, "keys added with +key=value: dotted name -> value")

    def to_dict(self) -> dict:
        """Plain nested values (YAML, JSON, wandb), the user's added keys at their places."""
        out = to_plain(self)
        for key, value in self.extras.items():
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = copy.deepcopy(value)
        return out


# ---------------------------------------------------------------------------------- reading the schema
def is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def user_fields(cls) -> list[dataclasses.Field]:
    """The fields a user writes (not the internal ones)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_rule(cls, f: dataclasses.Field) -> Rule:
    """The check of one field: its own rule, or the one its type and bounds give."""
    if f.metadata.get("rule") is not None:
        rule = f.metadata["rule"]
    else:
        rule = _rule_of_type(_hints(cls)[f.name], f.metadata.get("bounds") or {})
    if f.metadata.get("expect"):
        rule = _Worded(rule, f.metadata["expect"])
    return rule


class _Worded(Rule):
    """A rule whose message says what the field accepts in the field's own words."""

    def __init__(self, rule: Rule, text: str):
        self.rule, self.text = rule, text

    def accepts(self, value) -> bool:
        return self.rule.accepts(value)

    def normalise(self, value):
        return self.rule.normalise(value)


def _rule_of_type(hint, bounds: dict) -> Rule:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):  # Optional[X] / X | None
        members = [a for a in args if a is not type(None)]
        inner = (
            _rule_of_type(members[0], bounds)
            if len(members) == 1
            else Either(*(_rule_of_type(a, bounds) for a in members))
        )
        return Nullable(inner) if type(None) in args else inner
    if origin is Literal:
        return OneOf(*args)
    if origin is list:
        return ListOf(_rule_of_type(args[0], {}))
    if hint is bool:
        return Bool()
    if hint is int:
        return Int(bounds.get("minimum"))
    if hint is float:
        return Number(bounds.get("minimum"), bounds.get("positive", False), bounds.get("below"), bounds.get("maximum"))
    if hint is str:
        return Str()
    if hint is dict:
        return AnyMapping()
    raise TypeError(f"the schema has no rule for the type {hint!r}")


def section_class(cls, f: dataclasses.Field):
    return _hints(cls)[f.name]


def defaults_dict(cls=ExperimentConfig) -> dict:
    """Every user key with its default, as plain nested dicts."""
    return to_plain(cls(), with_name=False)


def to_plain(settings, with_name: bool = True) -> dict:
    """A settings dataclass as plain nested dicts (of the internal fields, ``config_name`` alone)."""
    out = {}
    for f in dataclasses.fields(settings):
        if f.metadata.get("internal") and not (with_name and f.name == "config_name"):
            continue
        value = getattr(settings, f.name)
        out[f.name] = to_plain(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def dotted_keys(cls=ExperimentConfig, prefix: str = "", sections: bool = False) -> list[str]:
    """The dotted name of every user key (and, with ``sections``, of every section)."""
    keys = []
    for f in user_fields(cls):
        if is_section(f):
            if sections:
                keys.append(prefix + f.name)
            keys += dotted_keys(section_class(cls, f), f"{prefix}{f.name}.", sections)
        else:
            keys.append(prefix + f.name)
    return keys


def unknown_key_error(key: str, source: str, aliases=()) -> ConfigError:
    """The error of a key the schema lacks, with the closest valid keys."""
    valid = dotted_keys(sections=True) + list(aliases)
    siblings = [k for k in valid if k.rpartition(".")[0] == key.rpartition(".")[0]]
    close = difflib.get_close_matches(key, siblings, n=3, cutoff=0.5) or difflib.get_close_matches(
        key, valid, n=3, cutoff=0.5
    )
    hint = f" Closest valid keys: {', '.join(close)}." if close else ""
    return ConfigError(f"unknown config key {key!r} in {source}.{hint} Use +{key}=VALUE to add a new key.")


# ---------------------------------------------------------------------------------- parsing
def parse(cls, given, path: str = "", extras: dict | None = None, source: str = "the config"):
    """``given`` (a mapping as read from YAML, or already a ``cls``) as a checked ``cls``.

    Missing keys take their defaults; a key the section lacks is an error naming it (with
    ``extras``, a dict, it is kept there instead: a resolved config's ``+key`` additions); a value
    of the wrong type or out of range is an error naming the key, the value and what it accepts.
    """
    if isinstance(given, cls):
        return given
    names = [f.name for f in user_fields(cls)]
    where = path.rstrip(".") or "the config"
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where} = {given!r}: expected a mapping of {', '.join(names)}")
    for key in given:
        if key not in names:
            if extras is None:
                raise unknown_key_error(path + str(key), source)
            extras[path + str(key)] = copy.deepcopy(given[key])
    values = {}
    for f in user_fields(cls):
        if f.name not in given:
            continue
        key, value = path + f.name, given[f.name]
        if is_section(f):
            values[f.name] = parse(section_class(cls, f), value, key + ".", extras, source)
            continue
        if f.metadata.get("convert"):
            value = f.metadata["convert"](value)
        values[f.name] = field_rule(cls, f).check(key, copy.deepcopy(value))
    return cls(**values)


def as_section(cls, value, path: str):
    """A layer's entry point takes its section typed, or as a mapping (a YAML file's form), checked."""
    return parse(cls, value, path + ".", source=path)


def replace_keys(settings, changes: Mapping[str, Any]):
    """A copy of ``settings`` with the dotted keys of ``changes`` set (resolved values, an output folder)."""
    direct, nested = {}, {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, inner in nested.items():
        direct[head] = replace_keys(direct.get(head, getattr(settings, head)), inner)
    return dataclasses.replace(settings, **direct)


def get_key(settings, key: str):
    """The value of a dotted key."""
    for part in key.split("."):
        settings = getattr(settings, part)
    return settings


# ---------------------------------------------------------------------------------- generated files
def _yaml_value(value) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def render_base_yaml() -> str:
    """``configs/_base.yaml``: every key with its default and help, as the schema says."""
    lines = [
        "# Every valid key of an experiment config with its default, generated from lilt_ds/schema.py",
        "# (python -m lilt_ds.schema; a test fails when this file is out of date). Presets override a",
        "# subset; `--overrides key=value` changes one, `+key=value` adds one this file lacks.",
    ]

    def emit(cls, indent: str) -> None:
        for f in user_fields(cls):
            if is_section(f):
                if not indent:
                    lines.append("")
                lines.append(f"{indent}{f.name}:  # {f.metadata['help']}")
                emit(section_class(cls, f), indent + "  ")
                continue
            text = f"{indent}{f.name}: {_yaml_value(getattr(cls(), f.name))}"
            lines.append(f"{text:<34} # {f.metadata['help']}" if len(text) < 34 else f"{text}  # {f.metadata['help']}")

    emit(ExperimentConfig, "")
    return "\n".join(lines) + "\n"


def render_reference() -> str:
    """The configuration reference page (docs/configuration.md): every key, type, default and help."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `lilt_ds/schema.py` (`python -m lilt_ds.schema`; a test fails when this page is out of "
        "date). Every key is checked when the config loads: a wrong type or range, an unknown key or a "
        "mapping of the wrong shape stops with `error: <key> = <value>: expected ...` and exit status 1. "
        "Set a key with `--overrides key=value` (dotted), add one of your own with `+key=value`.",
        "",
    ]

    def emit(cls, prefix: str, title: str, doc: str) -> None:
        out.extend([f"## `{title}`" if prefix else "## top level", ""])
        if doc:
            out.extend([doc, ""])
        out.extend(["| key | accepts | default | what it does |", "|---|---|---|---|"])
        nested = []
        for f in user_fields(cls):
            if is_section(f):
                nested.append(f)
                out.append(f"| `{prefix}{f.name}` | section | | {f.metadata['help']} (below) |")
                continue
            accepts = field_rule(cls, f).text.replace("|", "\\|")
            default = _yaml_value(getattr(cls(), f.name)).replace("|", "\\|")
            out.append(f"| `{prefix}{f.name}` | {accepts} | `{default}` | {f.metadata['help'].replace('|', '/')} |")
        out.append("")
        for f in nested:
            inner = section_class(cls, f)
            emit(inner, f"{prefix}{f.name}.", f"{prefix}{f.name}", f.metadata["help"])

    emit(ExperimentConfig, "", "", "")
    return "\n".join(out).rstrip() + "\n"


def generated_files(root: str) -> dict[str, str]:
    """Path (under the checkout ``root``) -> the text the schema generates for it."""
    import os

    return {
        os.path.join(root, "lilt_ds", "configs", "_base.yaml"): render_base_yaml(),
        os.path.join(root, "docs", "configuration.md"): render_reference(),
    }


def main() -> None:
    """Write the generated files of a checkout."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path, text in generated_files(root).items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
