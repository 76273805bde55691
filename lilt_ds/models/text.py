"""The text tower: a transformers encoder (BERT family), CLS or mean pooled."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

from ..schema import ModelSettings, TextSettings, as_section
from .efficient import TowerLayout
from .weights import local_folder_or_name, resolve_pkg

# architecture (so a model can be built and counted offline) and the weights the LilT paper used
TEXT_PRESETS = {
    "tiny": (
        dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
        "google/bert_uncased_L-2_H-128_A-2",
    ),
    "small": (
        dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
        "prajjwal1/bert-small",
    ),
    "base": (
        dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
        "princeton-nlp/unsup-simcse-bert-base-uncased",
    ),
    "large": (
        dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
        "princeton-nlp/unsup-simcse-bert-large-uncased",
    ),
}

# BERT and its relatives (RoBERTa, ELECTRA, MiniLM) name their parts alike
BERT_LAYOUT = TowerLayout(
    block=r"encoder\.layer\.(\d+)",
    attn_linears=r"encoder\.layer\.\d+\.attention\.(?:self\.(?:query|key|value)|output\.dense)",
    attn_out=r"encoder\.layer\.\d+\.attention\.output\.dense",
    mlp_linears=r"encoder\.layer\.\d+\.(?:intermediate|output)\.dense",
    mlp_out=r"encoder\.layer\.\d+\.output\.dense",
)


def _check_local(source: str, key: str) -> str:
    return local_folder_or_name(source, f"{key}={source}")


def text_sources(tower_cfg) -> tuple[dict | None, str, str | None]:
    """(preset architecture or None, architecture source, weights source or None) of ``model.text``."""
    name, pretrained = tower_cfg.name, tower_cfg.pretrained
    preset = TEXT_PRESETS.get(name)
    arch_source = preset[1] if preset else _check_local(resolve_pkg(name), "model.text.name")
    if pretrained is True:
        weights = arch_source
    elif pretrained is False:
        weights = None
    else:
        weights = _check_local(resolve_pkg(pretrained), "model.text.pretrained")
    return (preset[0] if preset else None), arch_source, weights


def build_tokenizer(model_cfg: ModelSettings | Mapping):
    """The tokenizer of the text tower: a pair's own (``model.init_from``), else ``model.text.tokenizer``,
    else where the text weights come from. ``model_cfg``: the ``model`` section (typed, or a mapping)."""
    from .sources import init_source

    model_cfg = as_section(ModelSettings, model_cfg, "model")
    source = init_source(model_cfg)
    if source is not None and source[0].KIND == "pair":
        return source[0].build_tokenizer(source[1], model_cfg)
    tower_cfg = model_cfg.text
    _, arch_source, weights = text_sources(tower_cfg)
    source = tower_cfg.tokenizer or weights or arch_source
    return AutoTokenizer.from_pretrained(_check_local(resolve_pkg(source), "model.text.tokenizer"))


class TextTower(nn.Module):
    """A transformers encoder without its pooler; ``forward(ids, mask)`` returns pooled features [B, width]."""

    kind = "text"

    def __init__(self, tower_cfg: TextSettings | Mapping, load_weights: bool = True):
        super().__init__()
        tower_cfg = as_section(TextSettings, tower_cfg, "model.text")
        preset_arch, arch_source, weights = text_sources(tower_cfg)
        self.model_name = tower_cfg.name
        self.pooling = tower_cfg.pooling
        if load_weights and weights is not None:
            trunk = AutoModel.from_pretrained(weights)
        else:
            config = BertConfig(**preset_arch) if preset_arch else AutoConfig.from_pretrained(arch_source)
            trunk = AutoModel.from_config(config)
        if getattr(trunk, "pooler", None) is not None:
            trunk.pooler = None  # unused: we pool ourselves, and a parameter without gradient confuses ZeRO
        self.trunk = trunk
        self.width = trunk.config.hidden_size
        self.layout = BERT_LAYOUT

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # non-reentrant: works when no input requires grad (frozen embeddings feeding adapters)
        kwargs = {"use_reentrant": False}
        if hasattr(self.trunk, "activation_checkpointing_enable"):  # transformers >= 5
            if enable:
                self.trunk.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.trunk.activation_checkpointing_disable()
        elif enable:
            self.trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            self.trunk.gradient_checkpointing_disable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
