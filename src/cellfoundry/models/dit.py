"""DiT denoiser with AdaLN-Zero blocks, for diffusion over a cell's token sequence.

Two denoisers share the same transformer (`DiT`):

- `LatentDiT`: the tokens are given (Xpressor latent tokens, [B, T, token_dim]); the DiT maps
  them to a prediction of the same shape.
- `GeneDiT`: the seed's literal design. A learned encoder maps the noisy normalised expression
  of all genes [B, G] to T tokens of token_dim features, the DiT processes them, and a decoder
  maps the tokens back to a prediction over all genes [B, G].

Conditioning: `c = time_embedding(t) + cond_vector` modulates every block (AdaLN-Zero); with
`cross_attention=True` the blocks also attend to condition tokens [B, C, D].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cellfoundry.models.attention import Attention


@dataclass
class DiTConfig:
    """Size of the denoiser. `num_tokens` x `token_dim` is the token sequence of one cell. The
    fields from the config (diffusion.d_model / n_layers / n_heads / mlp_ratio / cross_attention
    are hidden / depth / heads / mlp_ratio / cross_attention) have no defaults: the schema's are
    the only ones."""

    num_tokens: int
    token_dim: int
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float
    cross_attention: bool
    dropout: float = 0.0  # no config key

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) time steps t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """256-d sinusoidal embedding -> Linear -> SiLU -> Linear, [B] -> [B, hidden]."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] * (1 + scale[B, D]) + shift[B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """AdaLN-Zero block: `x = x + gate * f(LN(x) * (1 + scale) + shift)` for attention and MLP,
    with (shift, scale, gate) x 2 from `SiLU -> Linear(D, 6D)` of the conditioning vector.
    The modulation starts at zero, so a fresh block is the identity. The optional
    cross-attention to condition tokens has a zero-initialised output projection for the same
    reason."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        self.cross = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden, eps=1e-6)
            self.cross = Attention(hidden, heads, dropout=dropout)
            nn.init.zeros_(self.cross.out.weight)
            nn.init.zeros_(self.cross.out.bias)

    def forward(self, x, c, cond_tokens=None, cond_mask=None):
        """x [B, T, D], c [B, D], cond_tokens [B, C, D] (cross-attention only) -> [B, T, D]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        if self.cross is not None and cond_tokens is not None:
            x = x + self.cross(self.norm_cross(x), cond_tokens, cond_mask)
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) then a Linear to the output width; both start at zero."""

    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Token sequence [B, T, token_dim] + t [B] + condition -> prediction [B, T, token_dim].

    Tokens are projected to `hidden`, a learned positional embedding is added, `depth` AdaLN-Zero
    blocks run with `c = time_embedding(t) + cond_vector`, and the final layer projects back.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.token_dim, cfg.hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.hidden))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.cross_attention, cfg.dropout) for _ in range(cfg.depth)
        )
        self.final = FinalLayer(cfg.hidden, cfg.token_dim)

    def forward(self, x, t, cond_vector=None, cond_tokens=None, cond_mask=None):
        """x [B, T, token_dim]; t [B]; cond_vector [B, hidden] or None; cond_tokens [B, C, hidden]."""
        h = self.input_proj(x) + self.pos_embed
        c = self.t_embedder(t)
        if cond_vector is not None:
            c = c + cond_vector
        for block in self.blocks:
            h = block(h, c, cond_tokens, cond_mask)
        return self.final(h, c)


class LatentDiT(nn.Module):
    """Denoiser over given latent tokens: x_t [B, T, token_dim] -> prediction [B, T, token_dim]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.dit = DiT(cfg)

    def forward(self, x, t, cond_vector=None, cond_tokens=None, cond_mask=None):
        return self.dit(x, t, cond_vector, cond_tokens, cond_mask)


class GeneDiT(nn.Module):
    """Denoiser over all genes: x_t [B, G] -> encoder -> tokens [B, T, token_dim] -> DiT ->
    decoder -> prediction [B, G]."""

    def __init__(self, cfg: DiTConfig, n_genes: int, encoder_hidden: int = 1024):
        super().__init__()
        self.cfg = cfg
        self.n_genes = n_genes
        width = cfg.num_tokens * cfg.token_dim
        # Factorised through `encoder_hidden` so 20k genes x (64 x 256) tokens stays ~40M
        # parameters instead of G x T x D.
        self.encoder = nn.Sequential(nn.Linear(n_genes, encoder_hidden), nn.SiLU(), nn.Linear(encoder_hidden, width))
        self.dit = DiT(cfg)
        self.decoder = nn.Sequential(nn.Linear(width, encoder_hidden), nn.SiLU(), nn.Linear(encoder_hidden, n_genes))
        # A per-gene skip from x_t (at high noise the noise is close to a scaled x_t); diagonal so
        # it stays O(G) parameters for 20k genes.
        self.skip_scale = nn.Parameter(torch.zeros(n_genes))

    def forward(self, x, t, cond_vector=None, cond_tokens=None, cond_mask=None):
        b = x.shape[0]
        tokens = self.encoder(x).view(b, self.cfg.num_tokens, self.cfg.token_dim)
        out = self.dit(tokens, t, cond_vector, cond_tokens, cond_mask)
        return self.decoder(out.reshape(b, -1)) + self.skip_scale * x
