"""Multi-head attention through SDPA (flash kernels on CUDA), the one attention block of the
DiT denoiser and the Xpressor, with an optional counter of attention scores (benchmarks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

_score_counter: list[int] | None = None


@contextlib.contextmanager
def count_attention_scores() -> Iterator[list[int]]:
    """Count attention score elements (B·heads·queries·keys summed over calls) inside the block;
    yields a one-element list holding the running total."""
    global _score_counter
    previous, _score_counter = _score_counter, [0]
    try:
        yield _score_counter
    finally:
        _score_counter = previous


class Attention(nn.Module):
    """Queries x [B, Q, D] attend to `context` [B, K, D_kv] (self-attention when None);
    key_padding_mask [B, K] bool, True = ignore. Queries shared by all cells may be given as
    [Q, D]: they are projected once, then broadcast."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, nk, _ = context.shape
        nq, dim = x.shape[-2:]
        h = self.heads
        q = self.q(x).view(-1, nq, h, dim // h).transpose(1, 2).expand(b, -1, -1, -1)
        k, v = self.kv(context).view(b, nk, 2, h, dim // h).permute(2, 0, 3, 1, 4)
        mask = None
        if key_padding_mask is not None and key_padding_mask.any():
            mask = (~key_padding_mask)[:, None, None, :]  # True = may attend
        if _score_counter is not None:
            _score_counter[0] += b * h * nq * nk
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(b, nq, dim))
