"""State Embedding (SE) transformer, parameter-compatible with Arc Institute's SE-600M.

Spec: shared/spec/se.md. Parameter names equal the SE state_dict keys, so SE-600M weights load
with no renaming. Shapes use B = cells, L = sentence length (slot 0 = CLS), d = model width,
V = vocabulary size, T = token_dim (gene-embedding width).

Two encodings of a cell sentence:
- "se" (default, SE-600M): L2-normalised gene vectors, counts added through the soft-binned count
  encoder, no attention mask (SE sentences are filled, never padded).
- "scaled" (the seed document's variant): normalised gene vectors multiplied by the slot's
  expression value, no count encoder, padding slots (gene id < 0 outside slot 0) masked out of
  attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Width of the count encoder's hidden layer and number of soft bins (fixed in SE).
COUNT_HIDDEN = 512
N_BINS = 10
#: Width of the dataset embedding appended to the cell embedding (fixed in SE).
DATASET_DIM = 10
ENCODINGS = ("se", "scaled")


@dataclass
class SEConfig:
    """Architecture of an SE model. Defaults are SE-600M's sizes."""

    token_dim: int = 5120  # gene-embedding width (ESM2 for SE-600M)
    d_model: int = 2048
    nhead: int = 16
    d_hid: int = 2048  # feed-forward width
    nlayers: int = 16
    output_dim: int = 2048
    dropout: float = 0.0  # training only; inference always runs without dropout
    pad_length: int = 2048  # sentence length L including the CLS slot
    encoding: str = "se"  # "se" (SE-600M) | "scaled" (expression-scaled, padded sentences)
    num_datasets: int = 1  # classes of the dataset-classification head (training only)

    def __post_init__(self) -> None:
        if self.d_model % self.nhead:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by nhead ({self.nhead})")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")

    @property
    def embedding_dim(self) -> int:
        """Width of the cell embedding the model returns: output_dim + 10."""
        return self.output_dim + DATASET_DIM

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SEConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class SkipBlock(nn.Module):
    """Residual MLP block of the SE decoders: LN(x + dense(ReLU(intermediate_dense(x))))."""

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.intermediate_dense = nn.Linear(width, 2 * width)
        self.dense = nn.Linear(2 * width, width)
        self.layer_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_norm(x + self.dropout(self.dense(F.relu(self.intermediate_dense(x)))))


class SEEncoderLayer(nn.Module):
    """Post-norm transformer layer with fused qkv projection (SE's flash encoder layer)."""

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float = 0.0):
        super().__init__()
        self.nhead = nhead
        self.dropout_p = dropout
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """h [B, S, d]; attn_mask None or bool [B, 1, 1, S] (True = may attend). -> [B, S, d]."""
        b, s, d = h.shape
        q, k, v = self.qkv_proj(h).view(b, s, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0
        )
        attn = attn.transpose(1, 2).reshape(b, s, d)
        h = self.norm1(h + self.dropout(self.out_proj(attn)))
        ff = self.linear2(self.dropout(F.gelu(self.linear1(h))))
        return self.norm2(h + self.dropout(ff))


class SETransformer(nn.Module):
    """Stack of encoder layers; exists so that keys read `transformer_encoder.layers.{i}.*`."""

    def __init__(self, cfg: SEConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            SEEncoderLayer(cfg.d_model, cfg.nhead, cfg.d_hid, cfg.dropout) for _ in range(cfg.nlayers)
        )

    def forward(self, h: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            h = layer(h, attn_mask)
        return h


class StateEmbedding(nn.Module):
    """SE cell-embedding model.

    `forward(gene_ids, counts, gene_table)` -> cell embeddings [B, output_dim + 10];
    `encode(...)` -> final token outputs [B, L+1, d] and the key-padding mask [B, L+1].

    gene_ids [B, L] int: global vocabulary indices; slot 0 is the CLS slot (its id is ignored,
    cellfoundry writes CLS_ID = -2); ids < 0 elsewhere are padding (PAD_ID = -1).
    counts [B, L] float: SE count values ("se") or expression values ("scaled").
    gene_table [V, T] float: the vocabulary's gene embeddings (not normalised).
    """

    def __init__(self, cfg: SEConfig):
        super().__init__()
        self.cfg = cfg
        d, t = cfg.d_model, cfg.token_dim
        self.cls_token = nn.Parameter(torch.randn(1, t))
        self.dataset_token = nn.Parameter(torch.randn(1, t))
        self.encoder = nn.Sequential(nn.Linear(t, d), nn.LayerNorm(d), nn.SiLU())
        self.count_encoder = nn.Sequential(
            nn.Linear(1, COUNT_HIDDEN), nn.LeakyReLU(0.01), nn.Linear(COUNT_HIDDEN, N_BINS)
        )
        self.bin_encoder = nn.Embedding(N_BINS, d)
        self.transformer_encoder = SETransformer(cfg)
        self.decoder = nn.Sequential(SkipBlock(d, cfg.dropout), nn.Linear(d, cfg.output_dim))
        self.dataset_embedder = nn.Linear(cfg.output_dim, DATASET_DIM)

    # -- pieces --------------------------------------------------------------------------------
    def token_inputs(self, gene_ids: Tensor, counts: Tensor, gene_table: Tensor) -> tuple[Tensor, Tensor]:
        """Input token vectors [B, L+1, d] (before the transformer) and key-padding mask [B, L+1]
        (True = padding; all False in "se" mode)."""
        b, length = gene_ids.shape
        padding = gene_ids < 0
        padding[:, 0] = False  # slot 0 is CLS whatever its id
        genes = F.normalize(gene_table[gene_ids.clamp(min=0)], dim=-1)  # [B, L, T]
        if self.cfg.encoding == "scaled":
            genes = genes * counts.to(genes.dtype).unsqueeze(-1).masked_fill(padding.unsqueeze(-1), 0.0)
        x = torch.cat(
            [
                self.cls_token.to(genes.dtype).expand(b, 1, -1),
                genes[:, 1:],
                self.dataset_token.to(genes.dtype).expand(b, 1, -1),
            ],
            dim=1,
        )  # [B, L+1, T]: CLS replaces slot 0, dataset token appended
        h = self.encoder(x) * math.sqrt(self.cfg.d_model)
        if self.cfg.encoding == "se":
            bins = torch.softmax(self.count_encoder(counts.to(h.dtype).unsqueeze(-1)), dim=-1)  # [B, L, 10]
            h = torch.cat([h[:, :length] + bins @ self.bin_encoder.weight.to(h.dtype), h[:, length:]], dim=1)
            key_padding = torch.zeros(b, length + 1, dtype=torch.bool, device=h.device)
        else:
            key_padding = torch.cat([padding, padding.new_zeros(b, 1)], dim=1)
        return h, key_padding

    def encode(self, gene_ids: Tensor, counts: Tensor, gene_table: Tensor) -> tuple[Tensor, Tensor]:
        """Final transformer outputs [B, L+1, d] (0 = CLS, L = dataset token) and the key-padding
        mask [B, L+1] (True = padding slot). The decoder is not applied."""
        h, key_padding = self.token_inputs(gene_ids, counts, gene_table)
        attn_mask = None
        if key_padding.any():
            attn_mask = (~key_padding)[:, None, None, :]  # [B, 1, 1, L+1], True = attend
        return self.transformer_encoder(h, attn_mask), key_padding

    def decode(self, tokens: Tensor) -> Tensor:
        """Decoder on any tokens [..., d] -> [..., output_dim] (not normalised)."""
        return self.decoder(tokens)

    def embed_from_outputs(self, outputs: Tensor) -> Tensor:
        """Cell embeddings [B, output_dim + 10] from encode()'s outputs [B, L+1, d]; the decoder
        runs on the CLS and dataset tokens only."""
        g = self.decode(outputs[:, [0, -1]])  # [B, 2, output_dim]
        cell = F.normalize(g[:, 0], dim=-1)
        return torch.cat([cell, self.dataset_embedder(g[:, 1])], dim=-1)

    def forward(self, gene_ids: Tensor, counts: Tensor, gene_table: Tensor) -> Tensor:
        """Cell embeddings [B, output_dim + 10]: L2-normalised CLS part, then the dataset part."""
        outputs, _ = self.encode(gene_ids, counts, gene_table)
        return self.embed_from_outputs(outputs)


#: state_dict keys a checkpoint must hold for embedding (strictly checked on load).
def embedding_keys(cfg: SEConfig) -> dict[str, tuple[int, ...]]:
    """Expected key -> shape of the embedding weights for `cfg` (built on the meta device)."""
    with torch.device("meta"):
        model = StateEmbedding(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- training heads and losses


class TrainingHeads(nn.Module):
    """The reference's training-only heads, with its parameter names (binary_decoder.*,
    dataset_encoder.*), so that checkpoints carry every key the reference builds."""

    def __init__(self, cfg: SEConfig):
        super().__init__()
        width = cfg.d_model + cfg.output_dim + 1 + DATASET_DIM  # gene, cell, read depth, dataset
        self.binary_decoder = nn.Sequential(
            SkipBlock(width, cfg.dropout), SkipBlock(width, cfg.dropout), nn.Linear(width, 1)
        )
        self.dataset_encoder = nn.Sequential(
            nn.Linear(cfg.output_dim, cfg.d_model),
            nn.ReLU(),
            nn.LayerNorm(cfg.d_model),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_model, max(cfg.num_datasets, 1)),
        )


def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Energy distance between 1-D sample sets, per row: x [R, n], y [R, m] -> [R].

    2 E|x - y| - E|x - x'| - E|y - y'| (V-statistic, >= 0)."""
    xy = (x[:, :, None] - y[:, None, :]).abs().mean(dim=(1, 2))
    xx = (x[:, :, None] - x[:, None, :]).abs().mean(dim=(1, 2))
    yy = (y[:, :, None] - y[:, None, :]).abs().mean(dim=(1, 2))
    return 2 * xy - xx - yy


def dataset_spread(ds_emb: Tensor, dataset: Tensor) -> Tensor:
    """Mean squared distance of each cell's dataset embedding [B, 10] from its dataset's batch
    mean. The dataset part of SE's output should identify the dataset, not the cell: without
    this term a single-dataset model uses it as a second, unnormalised cell channel that swamps
    the normalised CLS part in Euclidean distances."""
    onehot = F.one_hot(dataset, int(dataset.max()) + 1).to(ds_emb.dtype)  # [B, K]
    means = (onehot.T @ ds_emb) / onehot.sum(0).clamp(min=1)[:, None]  # [K, 10]
    return ((ds_emb - means[dataset]) ** 2).sum(-1).mean()
