"""The conditional denoiser of the diffusion stage: a DiT (models.dit) and its condition model
(models.conditions), called as one module."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cellfoundry.models.conditions import ConditionModel


class ConditionalDenoiser(nn.Module):
    """A denoiser net and its condition model: forward(x_t, t, cond_batch, keep) -> output.

    keep [B, K] bool chooses per row and condition the real or the null embedding.
    Condition tokens are passed to the net only when it uses cross-attention.
    """

    def __init__(self, net: nn.Module, conditions: ConditionModel, cross_attention: bool = False):
        super().__init__()
        self.net = net
        self.conditions = conditions
        self.cross_attention = cross_attention

    def forward(self, x_t, t, cond_batch: Mapping[str, torch.Tensor] | None = None, keep: torch.Tensor | None = None):
        vector = tokens = None
        if cond_batch is not None and self.conditions.n_conditions:
            vector, tokens = self.conditions(cond_batch, keep)
        return self.net(x_t, t, vector, tokens if self.cross_attention else None)
