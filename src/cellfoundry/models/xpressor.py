"""Xpressor: compress a frozen base model's gene tokens into a few latent tokens and reconstruct
the cell's expression from those latents alone.

Shapes: B = cells, T = base tokens (gene tokens of one cell), d = base width, M = latent tokens
(general latents + one per label), D = Xpressor width (d_x), G = genes decoded, E = gene-vector
width (the vocabulary's table).

Public API (kept stable; the diffusion stage depends on it):

- `XpressorConfig`, `Xpressor` (nn.Module):
  `encode(tokens [B, K, T, d] (or [B, T, d] for one layer), key_padding_mask [B, T] | None)
  -> latents [B, M, D]` over the K base layers of `cfg.base_layers`,
  `decode(latents [B, M, D], gene_vectors [G, E]) -> DecoderOutput` (per-gene expression
  parameters), `classify(latents) -> {label: logits [B, classes]}`, `embedding(latents) -> [B, k]`.
- `decode_expression(model, latents, gene_ids, gene_table, library_size=None)`: latents ->
  log1p-normalised mean expression, or expected counts when a library size is given.
- `sample_counts(output, library_size, loss, generator)`: draw counts from the decoded NB/ZINB
  (with the likelihoods in cellfoundry.models.distributions, importable from here too).
- `save_xpressor(path, model, base_sha256, meta)` / `load_xpressor(path, base_checkpoint=...)`:
  the small checkpoint (Xpressor weights + the base checkpoint's SHA-256) and its loader, which
  refuses another base.

Base layers: the cross-attention reads the gene tokens of K layers of the frozen base (e.g. the
input tokens after the count encoding and the last layer), each projected and marked by a learned
layer embedding, as K*T keys. A small base's last layer blurs which genes the cell expresses; its
input layer still holds it (benchmarks/RESULTS.md, issue 16).

Dispersion: `gene` (theta from the gene's identity alone, so counts sampled from decoded latents
keep the data's per-gene variance) or `gene-cell` (theta decoded per cell and gene).

Attention: `standard` (the reference: latents cross-attend to the fixed base tokens, then attend
among themselves) or `criss-cross` (additionally the tokens attend back to the latents in every
block, so the tokens adapt too; cost O(T·M), never O(T²)). The attention block is the one of
cellfoundry.models.attention, whose `count_attention_scores()` counts the attention score
elements computed, which is how tests check the cost without timing.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellfoundry.checkpoints import load_stage_checkpoint, save_checkpoint
from cellfoundry.models.attention import Attention

# The likelihoods and count sampling live in .distributions; imported here for the model and for
# the importers of this module's public API (the diffusion stage decodes through it).
from cellfoundry.models.distributions import (  # noqa: F401 - re-exported
    expected_counts,
    log1p_normalize,
    mean_fraction,
    nb_log_prob,
    sample_counts,
    zinb_log_prob,
)
from cellfoundry.provenance import sha256
from cellfoundry.utils import UserError

LOSSES = ("nb", "zinb", "mse")
#: NB/ZINB dispersion: one theta per gene (a function of the gene's identity alone, so sampled
#: counts keep the residual variance of the data) or per cell and gene (decoded from the latents).
DISPERSIONS = ("gene", "gene-cell")
ATTENTIONS = ("standard", "criss-cross")
POOLINGS = (None, "cls", "mean")
CHECKPOINT_FORMAT = "cellfoundry-xpressor/1"
#: Elements of one [cells, genes, D] decoder activation per gene chunk (2**25 float32 = 128 MB;
#: the MLP's hidden layer is mlp_ratio times that).
DECODE_CHUNK_ELEMENTS = 2**25


@dataclass
class XpressorConfig:
    """Architecture and loss of an Xpressor (or of a pooled baseline when `pooling` is set).

    The fields from the config (config key xpressor.<field>; n_blocks / n_decoder_blocks are
    xpressor.n_layers / n_decoder_layers) have no defaults: the schema's are the only ones. A
    checkpoint written before a field existed is read with CHECKPOINT_DEFAULTS (from_dict)."""

    d_base: int  # width d of the base model's tokens
    gene_dim: int  # width E of the vocabulary's gene vectors (decoder gene queries)
    n_latent: int  # general latent tokens (label tokens come on top)
    d_model: int  # Xpressor width d_x
    n_blocks: int  # encoder blocks
    n_decoder_blocks: int  # decoder cross-attention blocks
    n_heads: int
    mlp_ratio: int  # MLP width of the encoder blocks, times d_model
    decoder_mlp_ratio: int  # MLP width of the decoder blocks (runs per cell x gene: keep small)
    dropout: float
    attention: str  # standard | criss-cross
    base_layers: list[int]  # base layers read (0 = input tokens)
    loss: str  # nb | zinb | mse
    dispersion: str  # gene | gene-cell
    log1p_head: bool  # the MSE term trains its own log1p read-out
    mse_weight: float  # weight of the MSE-on-log1p term added to NB/ZINB
    labels: dict[str, list[str]]  # obs column -> class names (from the data)
    label_dim: int  # bottleneck width of each label token
    label_weight: float  # weight of each label's cross-entropy
    gene_adapter: bool  # Linear-ReLU-Linear adapter on the frozen gene vectors
    adapter_hidden: int
    pooled_queries: bool  # latent queries start from the mean token of each layer read
    pooling: str | None = None  # baseline: None = Xpressor; "cls"/"mean" = one pooled vector (no config key)
    target_sum: float = 1e4  # library size of the log1p normalisation (no config key)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"xpressor.loss must be one of {LOSSES}, got {self.loss!r}.")
        if self.attention not in ATTENTIONS:
            raise UserError(f"xpressor.attention must be one of {ATTENTIONS}, got {self.attention!r}.")
        if self.dispersion not in DISPERSIONS:
            raise UserError(f"xpressor.dispersion must be one of {DISPERSIONS}, got {self.dispersion!r}.")
        if not self.base_layers:
            raise UserError("xpressor.base_layers is empty; give at least one layer, e.g. [-1] for the last.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.d_model % self.n_heads:
            raise UserError(
                f"xpressor.d_model ({self.d_model}) must be divisible by xpressor.n_heads ({self.n_heads})."
            )
        for name, classes in self.labels.items():
            if len(classes) < 2:
                raise UserError(f"xpressor label column {name!r} has {len(classes)} class(es); it needs at least 2.")

    @property
    def n_base_layers(self) -> int:
        """Base layers K read by the cross-attention (and by the mean-pooled baseline)."""
        return len(self.base_layers)

    @property
    def n_tokens(self) -> int:
        """Latent tokens per cell M (general + one per label)."""
        return self.n_latent + len(self.labels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> XpressorConfig:
        """The config stored in a checkpoint; fields it lacks (written before they existed) take
        CHECKPOINT_DEFAULTS, which reproduce the model such a checkpoint was trained as."""
        known = {f.name for f in fields(cls)}
        return cls(**{**copy.deepcopy(CHECKPOINT_DEFAULTS), **{k: v for k, v in values.items() if k in known}})


#: Values of fields missing from an older checkpoint's config: what the model was before the field
#: existed (e.g. dispersion gene-cell, no log1p head). For loading checkpoints only; the stages pass
#: every field from the validated config.
CHECKPOINT_DEFAULTS = dict(
    n_latent=8,
    d_model=64,
    n_blocks=2,
    n_decoder_blocks=1,
    n_heads=4,
    mlp_ratio=4,
    decoder_mlp_ratio=1,
    dropout=0.0,
    attention="standard",
    base_layers=[-1],
    loss="nb",
    dispersion="gene-cell",
    log1p_head=False,
    mse_weight=1.0,
    labels={},
    label_dim=16,
    label_weight=1.0,
    gene_adapter=False,
    pooled_queries=False,
    adapter_hidden=128,
)


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the non-padding tokens (mask True = padding): [B, T, d] -> [B, d], or per layer
    [B, K, T, d] -> [B, K*d] (the mean-pooled baseline's input)."""
    keep = torch.ones(tokens.shape[0], tokens.shape[-2], device=tokens.device) if mask is None else (~mask).float()
    keep = keep.to(tokens.dtype).unsqueeze(-1)
    if tokens.dim() == 4:
        keep = keep.unsqueeze(1)
    return ((tokens * keep).sum(-2) / keep.sum(-2).clamp(min=1.0)).flatten(1)


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ratio * dim, dim))


class EncoderBlock(nn.Module):
    """Pre-norm residual block: latents cross-attend to tokens, self-attend, MLP. In criss-cross
    mode the tokens then attend to the updated latents (token stream [B, T, D] is returned too)."""

    def __init__(self, cfg: XpressorConfig):
        super().__init__()
        d, h, p = cfg.d_model, cfg.n_heads, cfg.dropout
        self.norm_latent = nn.LayerNorm(d)
        self.norm_tokens = nn.LayerNorm(d)
        self.cross = Attention(d, h, dropout=p)
        self.norm_self = nn.LayerNorm(d)
        self.self_attn = Attention(d, h, dropout=p)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.mlp_ratio, p)
        self.criss_cross = cfg.attention == "criss-cross"
        if self.criss_cross:
            self.norm_back_tokens = nn.LayerNorm(d)
            self.norm_back_latent = nn.LayerNorm(d)
            self.back = Attention(d, h, dropout=p)

    def forward(self, latents: Tensor, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        latents = latents + self.cross(self.norm_latent(latents), self.norm_tokens(tokens), mask)
        z = self.norm_self(latents)
        latents = latents + self.self_attn(z, z)
        latents = latents + self.mlp(self.norm_mlp(latents))
        if self.criss_cross:
            tokens = tokens + self.back(self.norm_back_tokens(tokens), self.norm_back_latent(latents))
        return latents, tokens


class DecoderBlock(nn.Module):
    """Gene queries [B, G, D] (or [G, D] before the first block: the same for every cell)
    cross-attend to the latents [B, M, D], then MLP (pre-norm). Genes do not attend to each
    other, so a gene's prediction does not depend on the requested set."""

    def __init__(self, cfg: XpressorConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.cross = Attention(d, cfg.n_heads, dropout=cfg.dropout)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, cfg.decoder_mlp_ratio, cfg.dropout)

    def forward(self, queries: Tensor, latents: Tensor) -> Tensor:
        queries = queries + self.cross(self.norm_q(queries), self.norm_kv(latents))
        return queries + self.mlp(self.norm_mlp(queries))


class DecoderOutput(NamedTuple):
    """Per-gene expression parameters, each [B, G].

    scale: fraction of the cell's library per gene (softmax over the requested genes);
    theta: NB inverse dispersion; pi_logit: zero-inflation logit (ZINB; ignored otherwise);
    log1p: predicted log1p-normalised expression. With `log1p_head` its own read-out trained by
    the MSE term (the mean of log1p, which is far below log1p of the mean for sparse genes), so
    that the NB/ZINB mean stays the count-space mean that sampled counts need; without, log1p of
    the decoded mean, log1p(scale * target_sum), with scale * (1 - pi) for loss "zinb".
    """

    scale: Tensor
    theta: Tensor
    pi_logit: Tensor
    log1p: Tensor


class Xpressor(nn.Module):
    """Latent-token encoder + gene-query decoder (+ optional label heads). See module docstring."""

    def __init__(self, cfg: XpressorConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        k = cfg.n_base_layers
        if cfg.pooling is None:
            # base tokens d -> d_x, one projection per layer read; a learned embedding marks the layer
            self.token_proj = (
                nn.Linear(cfg.d_base, d) if k == 1 else nn.ModuleList(nn.Linear(cfg.d_base, d) for _ in range(k))
            )
            if k > 1:
                self.layer_embed = nn.Parameter(torch.randn(k, d) * 0.02)
            self.latents = nn.Parameter(torch.randn(cfg.n_tokens, d) * 0.02)
            if cfg.pooled_queries:  # the pooled baselines' map of their inputs, so Xpressor holds both
                self.query_proj = nn.Linear((k + 1) * cfg.d_base, cfg.n_tokens * d)
            self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_blocks))
            if cfg.pooled_queries:
                for block in self.blocks:
                    for last in (block.cross.out, block.self_attn.out, block.mlp[-1]):
                        nn.init.zeros_(last.weight)
                        nn.init.zeros_(last.bias)
        else:
            # Baseline: one pooled vector spread into the same number of latent tokens; [B, d] for
            # CLS (last layer), [B, K*d] for the mean over each layer read.
            d_in = cfg.d_base * (k if cfg.pooling == "mean" else 1)
            self.pooled_proj = nn.Linear(d_in, cfg.n_tokens * d)
        self.final_norm = nn.LayerNorm(d)
        if cfg.gene_adapter:
            self.gene_proj = nn.Sequential(
                nn.Linear(cfg.gene_dim, cfg.adapter_hidden), nn.ReLU(), nn.Linear(cfg.adapter_hidden, d)
            )
        else:
            self.gene_proj = nn.Linear(cfg.gene_dim, d)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_decoder_blocks))
        self.head_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)  # scale logit, theta (gene-cell), zero-inflation logit
        if cfg.dispersion == "gene":
            self.theta_head = nn.Linear(d, 1)  # theta from the gene query alone
        if cfg.log1p_head:
            # Its own read-out, not a zero-initialised correction on top of the detached log1p of the
            # NB mean: that learnt far worse on the demo (held-out Pearson 0.58 against 0.65).
            self.log1p_out = nn.Linear(d, 1)
        self.bottlenecks = nn.ModuleDict({name: nn.Linear(d, cfg.label_dim) for name in cfg.labels})
        self.classifiers = nn.ModuleDict({name: nn.Linear(cfg.label_dim, len(c)) for name, c in cfg.labels.items()})

    # -- encoder ---------------------------------------------------------------------------------
    def encode(self, tokens: Tensor, key_padding_mask: Tensor | None = None, cls: Tensor | None = None) -> Tensor:
        """Base gene tokens [B, K, T, d] of the K layers read ([B, T, d] when K = 1; mask [B, T],
        True = padding) -> latents [B, M, D]. The layers' tokens are projected each, marked by
        their layer embedding and concatenated into K*T keys. With `pooled_queries` the latent
        queries start from a linear map of the mean token of each layer and the last layer's CLS
        [B, d] (`cls`, required then), the pooled baselines' inputs.

        For a pooled baseline `tokens` is the pooled vector [B, d] or [B, K*d] (mask ignored)."""
        if self.cfg.pooling is not None:
            b = tokens.shape[0]
            return self.final_norm(self.pooled_proj(tokens).view(b, self.cfg.n_tokens, self.cfg.d_model))
        if tokens.dim() == 4 and self.cfg.n_base_layers == 1:
            tokens = tokens[:, 0]
        latents = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        if self.cfg.pooled_queries:
            if cls is None:
                raise ValueError("an Xpressor with pooled_queries needs the base's CLS output")
            summary = torch.cat([masked_mean(tokens, key_padding_mask), cls.to(tokens.dtype)], dim=-1)
            latents = latents + self.query_proj(summary).view_as(latents)
        if self.cfg.n_base_layers == 1:
            x = self.token_proj(tokens)
        else:
            x = torch.cat([proj(tokens[:, i]) + self.layer_embed[i] for i, proj in enumerate(self.token_proj)], dim=1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.repeat(1, self.cfg.n_base_layers)
        for block in self.blocks:
            latents, x = block(latents, x, key_padding_mask)
        return self.final_norm(latents)

    # -- decoder ---------------------------------------------------------------------------------
    def gene_queries(self, gene_vectors: Tensor) -> Tensor:
        """Frozen gene vectors [G, E] -> decoder queries [G, D] (gene identity only)."""
        return self.gene_proj(F.normalize(gene_vectors, dim=-1))

    def decode(self, latents: Tensor, gene_vectors: Tensor) -> DecoderOutput:
        """Latents [B, M, D] + gene vectors [G, E] -> DecoderOutput with [B, G] fields.

        Genes never attend to each other, so the decoder runs over chunks of at most
        DECODE_CHUNK_ELEMENTS // (B * D) genes (one chunk on the demo): its activations
        [B, G, D * mlp_ratio] would otherwise take gigabytes for 20,000 genes. Only the softmax
        over genes needs them all, and it runs on the [B, G] logits."""
        q0 = self.gene_queries(gene_vectors.to(latents.dtype))  # [G, D], broadcast in block 1
        chunk = max(1, DECODE_CHUNK_ELEMENTS // max(1, latents.shape[0] * self.cfg.d_model))
        raw, log1p = [], []
        for lo in range(0, q0.shape[0], chunk):
            q = q0[lo : lo + chunk]
            if not self.decoder_blocks:
                q = q.unsqueeze(0).expand(latents.shape[0], -1, -1)
            for block in self.decoder_blocks:
                q = block(q, latents)
            h = self.head_norm(q)
            raw.append(self.head(h).float())  # [B, g, 3]; losses in fp32
            if self.cfg.log1p_head:  # trained by the MSE term alone; the NB mean stays the count mean
                log1p.append(self.log1p_out(h).float()[..., 0])
        raw = torch.cat(raw, dim=1)
        scale = torch.softmax(raw[..., 0], dim=-1)
        if self.cfg.dispersion == "gene":
            theta_logit = self.theta_head(q0).float()[:, 0]
            theta = (F.softplus(theta_logit) + 1e-4).expand_as(scale)
        else:
            theta = F.softplus(raw[..., 1]) + 1e-4
        if self.cfg.log1p_head:
            log1p = torch.cat(log1p, dim=1)
        else:
            log1p = torch.log1p(mean_fraction(scale, raw[..., 2], self.cfg.loss) * self.cfg.target_sum)
        return DecoderOutput(scale, theta, raw[..., 2], log1p)

    # -- labels and embedding --------------------------------------------------------------------
    def label_vectors(self, latents: Tensor) -> dict[str, Tensor]:
        """Bottleneck vector [B, label_dim] of each label's token (the last len(labels) latents)."""
        return {
            name: self.bottlenecks[name](latents[:, self.cfg.n_latent + i]) for i, name in enumerate(self.cfg.labels)
        }

    def classify(self, latents: Tensor) -> dict[str, Tensor]:
        """Label logits {column: [B, classes]}."""
        return {name: self.classifiers[name](v) for name, v in self.label_vectors(latents).items()}

    def embedding(self, latents: Tensor) -> Tensor:
        """Cell embedding: the first label's bottleneck vector [B, label_dim] when labels are
        configured, else the mean of the latent tokens [B, D]."""
        if self.cfg.labels:
            return next(iter(self.label_vectors(latents).values()))
        return latents.mean(dim=1)

    # -- loss ------------------------------------------------------------------------------------
    def reconstruction_loss(self, out: DecoderOutput, counts: Tensor, library_size: Tensor) -> dict[str, Tensor]:
        """Per-term losses (means over cells and genes). counts [B, G] raw counts of the decoded
        genes; library_size [B] the cell's total over all decodable genes. When only a subset of
        the genes is decoded (a training step's random subset), its predicted fractions cover the
        subset's observed share of the library: the MSE term then compares against the same
        log1p-normalised expression as the evaluation, not one renormalised to the subset."""
        observed = counts.sum(1)
        share = (observed / library_size.clamp(min=1.0))[:, None]
        target = log1p_normalize(counts, library_size, self.cfg.target_sum)
        if self.cfg.log1p_head:  # the read-out predicts the whole library's log1p expression
            predicted = out.log1p
        else:
            predicted = torch.log1p(mean_fraction(out.scale, out.pi_logit, self.cfg.loss) * share * self.cfg.target_sum)
        terms = {"mse": F.mse_loss(predicted, target)}
        if self.cfg.loss in ("nb", "zinb"):
            mu = out.scale * observed[:, None]
            if self.cfg.loss == "nb":
                nll = -nb_log_prob(counts, mu, out.theta)
            else:
                nll = -zinb_log_prob(counts, mu, out.theta, out.pi_logit)
            terms["nll"] = nll.mean()
            terms["loss"] = terms["nll"] + self.cfg.mse_weight * terms["mse"]
        else:
            terms["loss"] = terms["mse"]
        return terms


# -- public decoding -----------------------------------------------------------------------------
def decode_expression(
    model: Xpressor,
    latents: Tensor,
    gene_ids: Tensor,
    gene_table: Tensor,
    library_size: Tensor | None = None,
) -> Tensor:
    """Latent tokens [B, M, D] -> mean expression [B, G] of the genes `gene_ids` [G] (vocabulary
    indices into gene_table [V, E]).

    Without `library_size`: log1p-normalised expression, the scale of the training targets (with
    `log1p_head` the read-out trained on them, else log1p of the decoded mean). With a library
    size [B]: expected counts of the decoded NB/ZINB (times 1 - pi for ZINB). Fractions are normalised over
    the requested genes, so request the gene set the model was trained on to match training.
    """
    out = model.decode(latents, gene_table[gene_ids])
    if library_size is None:
        return out.log1p
    return expected_counts(out, library_size, model.cfg.loss)


# -- checkpoint ----------------------------------------------------------------------------------
def save_xpressor(
    path: str | os.PathLike,
    model: Xpressor,
    base_sha256: str,
    base_state_dict: dict[str, Tensor] | None = None,
    meta: dict | None = None,
) -> None:
    """Write the small checkpoint atomically: Xpressor weights, config, the base checkpoint's
    SHA-256, optionally the base weights that were fine-tuned (unfrozen last layer), and `meta`
    (plain Python values: gene symbols, statistics)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "base_sha256": base_sha256,
        "base_state_dict": {k: v.detach().cpu() for k, v in (base_state_dict or {}).items()},
        "meta": meta or {},
    }
    save_checkpoint(path, payload)


@dataclass
class XpressorCheckpoint:
    model: Xpressor
    config: XpressorConfig
    base_sha256: str
    base_state_dict: dict[str, Tensor]
    meta: dict


def load_xpressor(
    path: str | os.PathLike,
    base_checkpoint: str | os.PathLike | None = None,
    base_sha256: str | None = None,
    map_location: str | torch.device = "cpu",
) -> XpressorCheckpoint:
    """Load a checkpoint written by save_xpressor (weights_only, no pickled objects).

    Pass the base model's checkpoint file (its SHA-256 is computed) or its `base_sha256`; a
    mismatch raises UserError, because Xpressor weights only fit the base they were trained on.
    `base_state_dict` holds the fine-tuned base weights to apply on top of the base (may be empty).
    """
    payload = load_stage_checkpoint(path, CHECKPOINT_FORMAT, "Xpressor", "xpressor_train", map_location)
    if base_checkpoint is not None:
        # cached per process: xpressor_encode hashes the same (SE-600M: several GB) base again for provenance
        base_sha256 = sha256(base_checkpoint)
    if base_sha256 is not None and base_sha256 != payload["base_sha256"]:
        where = f" ({base_checkpoint})" if base_checkpoint is not None else ""
        raise UserError(
            f"Xpressor checkpoint {path} was trained on a base model with SHA-256 {payload['base_sha256'][:12]}..., "
            f"but the given base{where} has SHA-256 {base_sha256[:12]}...; use the base checkpoint it was "
            "trained on, or retrain Xpressor on this base (snakemake --forcerun xpressor_train)."
        )
    cfg = XpressorConfig.from_dict(payload["config"])
    model = Xpressor(cfg)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return XpressorCheckpoint(model, cfg, payload["base_sha256"], payload["base_state_dict"], payload["meta"])
