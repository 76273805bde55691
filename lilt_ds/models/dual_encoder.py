"""DualEncoder: two towers, one linear projection each, L2-normalised, and a learnable temperature."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from timm.layers import PatchDropout
from torch import nn

from .efficient import apply_unlocks
from .modes import LOCKED_TOWERS, check_checkpointing, check_mode, check_unlock_for_mode
from .recompute import apply_frozen_recompute
from .sources import init_source
from .text import TextTower
from .vision import DEFAULT_IMAGE_SIZE, VisionTower, set_patch_dropout

MAX_LOGIT_SCALE = math.log(100.0)
"""The temperature's ceiling: logits at most 100 x the cosine similarity (CLIP's clamp)."""
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""Initial log-scale of a softmax (CLIP) model: temperature 0.07."""
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
"""Initial log-scale of a sigmoid (SigLIP) model: the model stores log(10), forward returns 10."""
SIGLIP_INIT_LOGIT_BIAS = -10.0
"""Initial logit bias of a SigLIP model (offsets the N-1 negatives per positive)."""


class DualEncoder(nn.Module):
    """``forward(images, input_ids, attention_mask) -> (image_emb, text_emb, logit_scale[, logit_bias])``.

    ``logit_scale`` is the multiplier exp(s) of the learnable log-scale s (shape [1]: DeepSpeed's bf16
    broadcast cannot view a 0-d parameter); ``logit_bias`` is returned only when the model has one
    (SigLIP). A fully locked tower runs in eval mode under no_grad, so it keeps no activations.
    """

    def __init__(
        self,
        vision: VisionTower,
        text: TextTower,
        embed_dim: int,
        init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
        init_logit_bias: float | None = None,
        locked=(),
        vision_proj: nn.Module | None = None,
        text_proj: nn.Module | None = None,
    ):
        """``locked``: the towers (by kind) whose pretrained state stays as it is (BatchNorm statistics
        included); the mode decides them (:data:`~lilt_ds.models.modes.LOCKED_TOWERS`). A pretrained
        pair passes its own projections; otherwise new ones map each tower's width to ``embed_dim``."""
        super().__init__()
        self.vision = vision
        self.text = text
        self.vision_proj = vision_proj if vision_proj is not None else nn.Linear(vision.width, embed_dim)
        self.text_proj = text_proj if text_proj is not None else nn.Linear(text.width, embed_dim)
        self.logit_scale = nn.Parameter(torch.full([1], float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.full([1], float(init_logit_bias)))
        self.locked = frozenset(locked)

    @property
    def fully_locked(self) -> set[str]:
        """The locked towers that train nothing (read from their parameters, so it cannot go stale)."""
        return {kind for kind in self.locked if not any(p.requires_grad for p in getattr(self, kind).parameters())}

    def _tower_context(self, kind: str):
        return torch.no_grad() if kind in self.fully_locked else contextlib.nullcontext()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._tower_context("vision"):
            features = self.vision(images)
        return self.encode_image_features(features)

    def encode_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding of the image tower's pooled ``features`` (a cached locked tower's output)."""
        return F.normalize(self.vision_proj(features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._tower_context("text"):
            features = self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(features), dim=-1)

    def forward(self, images, input_ids, attention_mask, image_features=None):
        """``image_features`` (the locked image tower's output, cached) stands in for ``images`` (None)."""
        image_emb = self.encode_image(images) if image_features is None else self.encode_image_features(image_features)
        out = (image_emb, self.encode_text(input_ids, attention_mask), self.logit_scale.exp())
        return out if self.logit_bias is None else out + (self.logit_bias,)

    def train(self, mode: bool = True):
        super().train(mode)
        fully_locked = self.fully_locked
        for kind in self.locked:
            tower = getattr(self, kind)
            if kind in fully_locked:
                tower.eval()
                for m in tower.modules():  # dropping patches still saves a locked tower's compute
                    if isinstance(m, PatchDropout):
                        m.train(mode)
            else:  # frozen BatchNorm statistics stay as pretrained
                for m in tower.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [0, ln 100] (call after each optimizer step, as OpenCLIP does)."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def encode_batch(model, batch: dict):
    """``model``'s forward on a training batch: its ``images``, or the cached ``image_features`` that
    stand in for them (``data.cache_locked_features``)."""
    if "image_features" in batch:
        return model(None, batch["input_ids"], batch["attention_mask"], image_features=batch["image_features"])
    return model(batch["images"], batch["input_ids"], batch["attention_mask"])


def _freeze_tower(tower, mode: str, tower_cfg) -> None:
    """Apply the mode to one tower: trainable whole, or locked but for its unlock set."""
    unlock = list(tower_cfg.unlock)
    check_unlock_for_mode(mode, tower.kind, unlock)
    if tower.kind not in LOCKED_TOWERS[mode]:
        tower.requires_grad_(True)
        return
    trainable = apply_unlocks(tower, unlock, tower_cfg, f"model.{tower.kind}.unlock")
    for name, param in tower.trunk.named_parameters():
        param.requires_grad_(name in trainable)


@contextlib.contextmanager
def seeded_init_rng(seed: int, device: str | torch.device | None):
    """The generator that initialises weights on ``device`` (the CPU's unless a GPU is named),
    seeded with ``seed`` inside the block and as it was after it; every other generator untouched."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_gpu = device.type == "cuda"
    with (
        torch.random.fork_rng(devices=[device] if on_gpu else []),
        torch.cuda.device(device) if on_gpu else contextlib.nullcontext(),
    ):
        (torch.cuda.manual_seed if on_gpu else torch.random.default_generator.manual_seed)(seed)
        yield


def build_model(cfg, load_weights: bool = True, device: str | torch.device | None = None) -> DualEncoder:
    """Build the DualEncoder an experiment config describes, with its parameters frozen per mode.

    ``cfg``: an :class:`lilt_ds.schema.ExperimentConfig`. Random initialisation is seeded from ``cfg.seed``.
    ``load_weights=False`` skips every weight
    file and download (random init); with
    ``device="meta"`` nothing is allocated either, which is how the summary counts any preset offline.
    """
    mode = check_mode(cfg.mode)
    mcfg = cfg.model
    siglip = cfg.loss.type == "siglip"
    init_scale = mcfg.init_logit_scale
    init_bias = mcfg.init_logit_bias
    if init_scale is None:
        init_scale = SIGLIP_INIT_LOGIT_SCALE if siglip else CLIP_INIT_LOGIT_SCALE
    if init_bias is None and siglip:
        init_bias = SIGLIP_INIT_LOGIT_BIAS
    # randomly initialised weights (a tower without pretrained weights, adapters, projections) are a
    # function of the config alone, so a checkpoint's frozen part can always be rebuilt. Only the
    # generator that initialises them is seeded (and restored afterwards): torch.manual_seed would
    # also reseed every GPU's generator, each time a model is built.
    source = init_source(mcfg)
    with seeded_init_rng(cfg.seed, device), torch.device(device) if device is not None else contextlib.nullcontext():
        if source is not None and source[0].KIND == "pair":
            pair = source[0].build_pair(source[1], mcfg, load_weights=load_weights)
            vision, text = pair.vision, pair.text
            # the pair's own temperature (and bias) unless the config sets one
            scale = pair.logit_scale if mcfg.init_logit_scale is None else init_scale
            bias = pair.logit_bias if mcfg.init_logit_bias is None and pair.logit_bias is not None else init_bias
            model = DualEncoder(
                vision,
                text,
                None,
                scale,
                bias,
                locked=LOCKED_TOWERS[mode],
                vision_proj=pair.vision_proj,
                text_proj=pair.text_proj,
            )
            model.pair = pair.extra  # what an export to the pair's own format needs
        else:  # a weights source (an original LilT checkpoint) brings the towers' weights too
            tower_weights = load_weights and source is None
            vision = VisionTower(mcfg.vision, mcfg.image_size or DEFAULT_IMAGE_SIZE, load_weights=tower_weights)
            text = TextTower(mcfg.text, load_weights=tower_weights)
            # the projections draw from the generator before the adapters: the order fixes every init
            model = DualEncoder(vision, text, mcfg.embed_dim, init_scale, init_bias, locked=LOCKED_TOWERS[mode])
        if mcfg.vision.patch_dropout:
            set_patch_dropout(vision, mcfg.vision.patch_dropout)
        for tower, tower_cfg in ((vision, mcfg.vision), (text, mcfg.text)):
            _freeze_tower(tower, mode, tower_cfg)
            if tower_cfg.grad_checkpointing:
                check_checkpointing(mode, tower.kind, tower_cfg)
                tower.set_grad_checkpointing(True)
    if source is not None and source[0].KIND == "weights" and load_weights:
        source[0].load_weights(model, source[1], mcfg)
    model.vision_proj.requires_grad_(not mcfg.freeze_projections)
    model.text_proj.requires_grad_(not mcfg.freeze_projections)
    model.logit_scale.requires_grad_(not mcfg.freeze_logit_scale)
    if cfg.memory.frozen_recompute:
        apply_frozen_recompute(model)
    model.train()
    return model
