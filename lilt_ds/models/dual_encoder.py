"""DualEncoder: two towers, one linear projection each, L2-normalised, and a learnable temperature."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..losses import CLIP_INIT_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from .efficient import apply_unlocks
from .text import TextTower
from .vision import VisionTower

MAX_LOGIT_SCALE = math.log(100.0)

# which towers each mode locks; a locked tower trains only its `unlock` set
LOCKED_TOWERS = {"clip": (), "lit": ("vision",), "lilt": ("vision", "text")}


class DualEncoder(nn.Module):
    """``forward(images, input_ids, attention_mask) -> (image_emb, text_emb, logit_scale[, logit_bias])``.

    ``logit_scale`` is the multiplier exp(s) of the learnable log-scale s (shape [1]: DeepSpeed's bf16
    broadcast cannot view a 0-d parameter); ``logit_bias`` is returned only when the model has one
    (SigLIP). A fully locked tower runs in eval mode under no_grad, so it keeps no activations.
    """

    def __init__(self, vision: VisionTower, text: TextTower, embed_dim: int,
                 init_logit_scale: float = CLIP_INIT_LOGIT_SCALE, init_logit_bias: float | None = None):
        super().__init__()
        self.vision = vision
        self.text = text
        self.vision_proj = nn.Linear(vision.width, embed_dim)
        self.text_proj = nn.Linear(text.width, embed_dim)
        self.logit_scale = nn.Parameter(torch.full([1], float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.full([1], float(init_logit_bias)))
        self.fully_locked: set[str] = set()   # towers that train nothing
        self.locked: set[str] = set()         # towers whose norms keep their running statistics

    def _tower_context(self, kind: str):
        return torch.no_grad() if kind in self.fully_locked else contextlib.nullcontext()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._tower_context("vision"):
            features = self.vision(images)
        return F.normalize(self.vision_proj(features), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._tower_context("text"):
            features = self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(features), dim=-1)

    def forward(self, images, input_ids, attention_mask):
        out = (self.encode_image(images), self.encode_text(input_ids, attention_mask), self.logit_scale.exp())
        return out if self.logit_bias is None else out + (self.logit_bias,)

    def train(self, mode: bool = True):
        super().train(mode)
        for kind in self.locked:
            tower = getattr(self, kind)
            if kind in self.fully_locked:
                tower.eval()
            else:  # frozen BatchNorm statistics stay as pretrained
                for m in tower.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [0, ln 100] (call after each optimizer step, as OpenCLIP does)."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def _freeze_tower(tower, mode: str, tower_cfg) -> bool:
    """Apply the mode to one tower; returns True when the tower is locked."""
    unlock = list(tower_cfg.get("unlock") or [])
    if tower.kind not in LOCKED_TOWERS[mode]:
        if unlock:
            raise ConfigError(
                f"mode={mode} trains the whole {tower.kind} tower, so model.{tower.kind}.unlock={unlock} "
                f"has no effect: set it to [] or use mode=lilt (or lit for a locked image tower)"
            )
        tower.requires_grad_(True)
        return False
    trainable = apply_unlocks(tower, unlock, tower_cfg, f"model.{tower.kind}.unlock")
    for name, param in tower.trunk.named_parameters():
        param.requires_grad_(name in trainable)
    return True


@contextlib.contextmanager
def seeded_init_rng(seed: int, device: str | torch.device | None):
    """The generator that initialises weights on ``device`` (the CPU's unless a GPU is named),
    seeded with ``seed`` inside the block and as it was after it; every other generator untouched."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    on_gpu = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_gpu else []), \
            (torch.cuda.device(device) if on_gpu else contextlib.nullcontext()):
        (torch.cuda.manual_seed if on_gpu else torch.random.default_generator.manual_seed)(seed)
        yield


def build_model(cfg, load_weights: bool = True, device: str | torch.device | None = None) -> DualEncoder:
    """Build the DualEncoder an experiment config describes, with its parameters frozen per mode.

    Random initialisation is seeded from ``cfg.seed``. ``load_weights=False`` skips every weight
    file and download (random init); with
    ``device="meta"`` nothing is allocated either, which is how the summary counts any preset offline.
    """
    from ..config import MODES

    if cfg["mode"] not in MODES:
        raise ConfigError(f"unknown mode {cfg['mode']!r}: choose one of {', '.join(MODES)}")
    mcfg = cfg["model"]
    siglip = cfg.get("loss", {}).get("type") == "siglip"
    init_scale = mcfg.get("init_logit_scale")
    init_bias = mcfg.get("init_logit_bias")
    if init_scale is None:
        init_scale = SIGLIP_INIT_LOGIT_SCALE if siglip else CLIP_INIT_LOGIT_SCALE
    if init_bias is None and siglip:
        init_bias = SIGLIP_INIT_LOGIT_BIAS
    # randomly initialised weights (a tower without pretrained weights, adapters, projections) are a
    # function of the config alone, so a checkpoint's frozen part can always be rebuilt. Only the
    # generator that initialises them is seeded (and restored afterwards): torch.manual_seed would
    # also reseed every GPU's generator, each time a model is built.
    with seeded_init_rng(cfg.get("seed", 0), device), \
            (torch.device(device) if device is not None else contextlib.nullcontext()):
        vision = VisionTower(mcfg["vision"], mcfg["image_size"], load_weights=load_weights)
        text = TextTower(mcfg["text"], load_weights=load_weights)
        model = DualEncoder(vision, text, mcfg["embed_dim"], init_scale, init_bias)
        for tower, tower_cfg in ((vision, mcfg["vision"]), (text, mcfg["text"])):
            if _freeze_tower(tower, cfg["mode"], tower_cfg):
                model.locked.add(tower.kind)
                if not any(p.requires_grad for p in tower.parameters()):
                    model.fully_locked.add(tower.kind)
            if tower_cfg.get("grad_checkpointing"):
                if tower.kind in model.fully_locked:
                    raise ConfigError(
                        f"model.{tower.kind}.grad_checkpointing is on, but the tower is fully locked and keeps "
                        "no activations anyway: turn it off"
                    )
                tower.set_grad_checkpointing(True)
    model.vision_proj.requires_grad_(not mcfg.get("freeze_projections", False))
    model.text_proj.requires_grad_(not mcfg.get("freeze_projections", False))
    model.logit_scale.requires_grad_(not mcfg.get("freeze_logit_scale", False))
    if (cfg.get("memory") or {}).get("frozen_recompute"):
        from ..ops.recompute import apply_frozen_recompute

        apply_frozen_recompute(model)
    model.train()
    return model
