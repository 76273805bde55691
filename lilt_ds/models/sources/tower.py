"""A tower taken from a pretrained pair: the pair's own module as the trunk, behind the tower interface
(``kind``, ``trunk``, ``layout``, ``width``, ``model_name``; a vision tower also ``mean``, ``std``,
``interpolation``, ``image_size`` and ``eval_preprocess``, how its source evaluates) that the unlocks,
the summary and the trainer use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..efficient import TowerLayout


class PairTower(nn.Module):
    """``forward(*inputs)`` = ``features(trunk, *inputs)``: pooled features before the projection."""

    def __init__(
        self,
        kind: str,
        trunk: nn.Module,
        features: Callable,
        layout: TowerLayout | None,
        width: int,
        model_name: str,
        checkpointing: Callable | None = None,
        **preprocess,
    ):
        super().__init__()
        self.kind, self.trunk, self.layout, self.width, self.model_name = kind, trunk, layout, width, model_name
        self._features, self._checkpointing = features, checkpointing
        # vision: mean, std, interpolation, image_size, eval_preprocess; text: context_length
        for key, value in preprocess.items():
            setattr(self, key, value)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self._checkpointing is None:
            raise NotImplementedError(f"the {self.kind} tower {self.model_name} has no activation checkpointing")
        self._checkpointing(self.trunk, enable)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._features(self.trunk, *inputs)
