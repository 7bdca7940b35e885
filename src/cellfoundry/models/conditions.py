"""Condition embeddings of the diffusion model: categorical, multi-component, set, hierarchical.

Conditions are declared in the config from obs columns (`datasets.<ds>.conditions`). Two parts:

- `ConditionCodec` (no torch parameters): learns the label vocabularies from the training
  cells' obs and turns obs rows (a DataFrame, or sampling requests given as column -> value)
  into integer / float arrays, one set of arrays per condition, keyed "<name>.<field>".
  A missing value (NaN/None/""/"nan") is encoded as "missing", which the embedders treat like the
  attribute's null (dropped) embedding: an unlabelled cell trains, and is sampled, unconditionally
  in that attribute, and its value forms no label of the vocabulary. An unknown label is a
  UserError listing the known ones.
- `ConditionModel` (nn.Module): one embedder per condition, each [B, ...] -> [B, dim]; a learned
  null embedding per condition for classifier-free guidance; the K embeddings are combined by
  concatenation + MLP into one vector [B, dim] (AdaLN) and also returned as tokens [B, K, dim]
  (cross-attention).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cellfoundry.utils import UserError

KINDS = ("categorical", "multi_component", "set", "hierarchical")


@dataclass
class ConditionSpec:
    """One condition as declared in the config (see config/README.md, Datasets)."""

    name: str
    kind: str
    columns: list[str]
    continuous: list[str] = field(default_factory=list)
    delimiter: str | None = None
    none_value: str | None = None
    guidance_scale: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"condition {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        if self.kind in ("categorical", "set") and len(self.columns) != 1:
            raise UserError(f"condition {self.name!r} ({self.kind}) takes exactly one column; got {self.columns}.")
        if self.continuous and self.kind != "multi_component":
            raise UserError(f"condition {self.name!r}: `continuous` columns are only for kind multi_component.")

    @property
    def all_columns(self) -> list[str]:
        return list(self.columns) + list(self.continuous)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "nan"):
        return True  # "nan": pandas' rendering of a missing value after astype(str)
    return False


def _as_label(value: Any) -> str | None:
    return None if _is_missing(value) else str(value)


def _set_elements(value: Any, delimiter: str | None) -> list[str]:
    """A set cell: a list/tuple/array, or a delimited string (also accepted without delimiter)."""
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return [str(v) for v in value if not _is_missing(v)]
    if _is_missing(value):
        return []
    if delimiter is not None:
        return [part.strip() for part in str(value).split(delimiter) if part.strip()]
    return [str(value)]


class ConditionCodec:
    """Label vocabularies of the declared conditions and the obs -> arrays encoding.

    Array fields per condition kind (N rows):
      categorical:      "<name>.label" int64 [N]          0..n-1, n = missing
      multi_component:  "<name>.parts" int64 [N, P]       0 = none_value, 1..n_p labels, n_p+1 = missing
                        "<name>.cont" float32 [N, Q]      standardised continuous parts (0 if missing)
                        "<name>.cont_mask" float32 [N, Q] 1 where the continuous value is present
      set:              "<name>.elements" int64 [N, S]    0 = padding, 1..n elements
      hierarchical:     "<name>.levels" int64 [N, L]      level l: 0..n_l-1, n_l = missing
    """

    def __init__(self, specs: Sequence[ConditionSpec], vocab: dict, cont_stats: dict):
        self.specs = list(specs)
        self.vocab = vocab  # name -> list of label lists (one per column; one list for sets)
        self.cont_stats = cont_stats  # name -> (mean [Q], std [Q])

    # -- construction -------------------------------------------------------------------
    @classmethod
    def fit(cls, specs: Sequence[ConditionSpec], obs: pd.DataFrame) -> ConditionCodec:
        vocab: dict[str, list[list[str]]] = {}
        cont_stats: dict[str, tuple[list[float], list[float]]] = {}
        for spec in specs:
            missing = [c for c in spec.all_columns if c not in obs.columns]
            if missing:
                raise UserError(
                    f"condition {spec.name!r} names obs column(s) {missing} that the data does not have; "
                    f"available columns: {', '.join(map(str, obs.columns))}."
                )
            if spec.kind == "set":
                elements = sorted({e for v in obs[spec.columns[0]] for e in _set_elements(v, spec.delimiter)})
                vocab[spec.name] = [elements]
            else:
                lists = []
                for col in spec.columns:
                    labels = {_as_label(v) for v in obs[col]} - {None}
                    if spec.kind == "multi_component" and spec.none_value is not None:
                        labels.discard(spec.none_value)
                    lists.append(sorted(labels))
                vocab[spec.name] = lists
            if spec.continuous:
                values = obs[spec.continuous].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
                mean = np.nan_to_num(np.nanmean(values, axis=0)) if len(values) else np.zeros(len(spec.continuous))
                std = np.nan_to_num(np.nanstd(values, axis=0)) if len(values) else np.ones(len(spec.continuous))
                std = np.where(std > 0, std, 1.0)
                cont_stats[spec.name] = (mean.tolist(), std.tolist())
        return cls(specs, vocab, cont_stats)

    def to_dict(self) -> dict:
        return {"specs": [asdict(s) for s in self.specs], "vocab": self.vocab, "cont_stats": self.cont_stats}

    @classmethod
    def from_dict(cls, data: Mapping) -> ConditionCodec:
        return cls([ConditionSpec(**s) for s in data["specs"]], dict(data["vocab"]), dict(data["cont_stats"]))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def columns(self) -> list[str]:
        return [c for s in self.specs for c in s.all_columns]

    def sizes(self, spec: ConditionSpec) -> list[int]:
        return [len(v) for v in self.vocab[spec.name]]

    # -- encoding -------------------------------------------------------------------------
    def _lookup(self, spec: ConditionSpec, level: int, label: str, strict: bool) -> int | None:
        known = self.vocab[spec.name][level]
        index = {lab: i for i, lab in enumerate(known)}
        if label in index:
            return index[label]
        if strict:
            column = spec.columns[level] if spec.kind != "set" else spec.columns[0]
            raise UserError(
                f"unknown label {label!r} for condition {spec.name!r} (obs column {column!r}); "
                f"known labels: {', '.join(map(repr, known))}. Use one of them in diffusion.sample.requests."
            )
        return None

    def encode(self, obs: pd.DataFrame | Sequence[Mapping[str, Any]], strict: bool = True) -> dict[str, np.ndarray]:
        """obs rows -> arrays (see the class docstring). Columns absent from `obs` count as missing.

        strict: an unknown label raises UserError with the known labels; otherwise it is encoded
        as missing (used for held-out cells whose label never occurs in training).
        """
        if not isinstance(obs, pd.DataFrame):
            obs = pd.DataFrame(list(obs))
        n = len(obs)

        def column(col):
            return list(obs[col]) if col in obs.columns else [None] * n

        out: dict[str, np.ndarray] = {}
        for spec in self.specs:
            name = spec.name
            if spec.kind == "categorical":
                size = self.sizes(spec)[0]
                codes = np.full(n, size, dtype=np.int64)
                for i, v in enumerate(column(spec.columns[0])):
                    label = _as_label(v)
                    if label is not None:
                        code = self._lookup(spec, 0, label, strict)
                        codes[i] = size if code is None else code
                out[f"{name}.label"] = codes
            elif spec.kind == "hierarchical":
                sizes = self.sizes(spec)
                codes = np.array([sizes] * n, dtype=np.int64).reshape(n, len(sizes))
                for level, col in enumerate(spec.columns):
                    for i, v in enumerate(column(col)):
                        label = _as_label(v)
                        if label is not None:
                            code = self._lookup(spec, level, label, strict)
                            codes[i, level] = sizes[level] if code is None else code
                out[f"{name}.levels"] = codes
            elif spec.kind == "multi_component":
                sizes = self.sizes(spec)
                parts = np.array([[k + 1 for k in sizes]] * n, dtype=np.int64).reshape(n, len(sizes))
                for p, col in enumerate(spec.columns):
                    for i, v in enumerate(column(col)):
                        label = _as_label(v)
                        if label is None:
                            continue
                        if label == spec.none_value:
                            parts[i, p] = 0
                            continue
                        code = self._lookup(spec, p, label, strict)
                        parts[i, p] = sizes[p] + 1 if code is None else code + 1
                out[f"{name}.parts"] = parts
                q = len(spec.continuous)
                cont = np.zeros((n, q), dtype=np.float32)
                mask = np.zeros((n, q), dtype=np.float32)
                if q:
                    mean, std = (np.asarray(a) for a in self.cont_stats[name])
                    for j, col in enumerate(spec.continuous):
                        vals = pd.to_numeric(pd.Series(column(col), dtype=object), errors="coerce").to_numpy(np.float64)
                        present = ~np.isnan(vals)
                        cont[present, j] = (vals[present] - mean[j]) / std[j]
                        mask[present, j] = 1.0
                out[f"{name}.cont"] = cont
                out[f"{name}.cont_mask"] = mask
            else:  # set
                rows = []
                for v in column(spec.columns[0]):
                    codes = []
                    for element in _set_elements(v, spec.delimiter):
                        code = self._lookup(spec, 0, element, strict)
                        if code is not None:
                            codes.append(code + 1)
                    rows.append(codes)
                width = max([1] + [len(r) for r in rows])
                elements = np.zeros((n, width), dtype=np.int64)
                for i, r in enumerate(rows):
                    elements[i, : len(r)] = r
                out[f"{name}.elements"] = elements
        return out

    def labels(self, obs: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[str]:
        """A readable label per row, e.g. "cell_type=B cells | drug=A+dose=1.0" (for obs["condition"])."""
        if not isinstance(obs, pd.DataFrame):
            obs = pd.DataFrame(list(obs))
        parts_per_row: list[list[str]] = [[] for _ in range(len(obs))]
        for spec in self.specs:
            for i in range(len(obs)):
                values = []
                for col in spec.all_columns:
                    v = obs[col].iloc[i] if col in obs.columns else None
                    if isinstance(v, (list, tuple, np.ndarray)):
                        v = "+".join(map(str, v)) if len(v) else None
                    if not _is_missing(v):
                        values.append(str(v))
                parts_per_row[i].append(f"{spec.name}={'/'.join(values) if values else 'none'}")
        return [" | ".join(p) if p else "unconditional" for p in parts_per_row]


def collate_conditions(arrays: Mapping[str, np.ndarray], index: np.ndarray | slice) -> dict[str, torch.Tensor]:
    """Rows `index` of the codec arrays as tensors (set elements trimmed to the batch's longest)."""
    batch = {}
    for key, arr in arrays.items():
        part = torch.as_tensor(np.ascontiguousarray(arr[index]))
        if key.endswith(".elements"):
            width = max(1, int((part > 0).sum(1).max().item()) if len(part) else 1)
            part = part[:, :width]
        batch[key] = part
    return batch


# -- embedders ------------------------------------------------------------------------------


class CategoricalEmbedder(nn.Module):
    """label [B] (n = missing) -> Embedding(n + 1, dim) -> [B, dim]."""

    def __init__(self, n_labels: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_labels + 1, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, batch, name):
        return self.embedding(batch[f"{name}.label"])


class MultiComponentEmbedder(nn.Module):
    """Categorical parts (index 0 = none, n+1 = missing) each -> Embedding; continuous parts (value, present)
    -> MLP; concatenation -> MLP -> [B, dim]."""

    def __init__(self, part_sizes: Sequence[int], n_continuous: int, dim: int):
        super().__init__()
        part_dim = max(8, dim // 2)
        self.parts = nn.ModuleList(nn.Embedding(n + 2, part_dim) for n in part_sizes)
        for emb in self.parts:
            nn.init.normal_(emb.weight, std=0.02)
        self.n_continuous = n_continuous
        width = part_dim * len(part_sizes)
        if n_continuous:
            self.continuous = nn.Sequential(nn.Linear(2 * n_continuous, dim), nn.SiLU(), nn.Linear(dim, part_dim))
            width += part_dim
        self.mlp = nn.Sequential(nn.Linear(width, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, batch, name):
        parts = batch[f"{name}.parts"]
        pieces = [emb(parts[:, i]) for i, emb in enumerate(self.parts)]
        if self.n_continuous:
            values = batch[f"{name}.cont"].float()
            mask = batch[f"{name}.cont_mask"].float()
            pieces.append(self.continuous(torch.cat([values * mask, mask], dim=-1)))
        return self.mlp(torch.cat(pieces, dim=-1))


class SetEmbedder(nn.Module):
    """elements [B, S] (0 = padding) -> Embedding -> transformer encoder with a padding mask ->
    masked mean pooling -> [B, dim]. An empty set gets a learned "empty" embedding."""

    def __init__(self, n_elements: int, dim: int, layers: int = 1, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.embedding = nn.Embedding(n_elements + 1, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.empty = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.empty, std=0.02)

    def forward(self, batch, name):
        elements = batch[f"{name}.elements"]
        present = elements > 0  # [B, S]
        empty = ~present.any(dim=1)
        # Rows without elements would make attention all-masked (NaN); let them see slot 0 and
        # replace their result with the learned empty embedding below.
        padding = ~present
        padding[:, 0] &= ~empty
        h = self.encoder(self.embedding(elements), src_key_padding_mask=padding)
        weights = present.float().unsqueeze(-1)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return torch.where(empty[:, None], self.empty.expand_as(pooled), pooled)


def level_dim(n_labels: int, dim: int) -> int:
    """Embedding width for a hierarchy level: grows with its number of labels, at most `dim`."""
    return int(min(dim, 8 * math.ceil(math.sqrt(n_labels + 1))))


class HierarchicalEmbedder(nn.Module):
    """levels [B, L] (top first; n_l = missing) -> per-level embeddings of level-appropriate
    widths composed bottom-up: h = proj(e_L); h = MLP([h, e_{L-1}]); ... up to the top -> [B, dim]."""

    def __init__(self, level_sizes: Sequence[int], dim: int):
        super().__init__()
        widths = [level_dim(n, dim) for n in level_sizes]
        self.levels = nn.ModuleList(nn.Embedding(n + 1, w) for n, w in zip(level_sizes, widths))
        for emb in self.levels:
            nn.init.normal_(emb.weight, std=0.02)
        self.bottom = nn.Linear(widths[-1], dim)
        self.compose = nn.ModuleList(
            nn.Sequential(nn.Linear(dim + w, dim), nn.SiLU(), nn.Linear(dim, dim)) for w in widths[:-1]
        )

    def forward(self, batch, name):
        codes = batch[f"{name}.levels"]
        n_levels = codes.shape[1]
        h = self.bottom(self.levels[-1](codes[:, -1]))
        for level in range(n_levels - 2, -1, -1):
            h = self.compose[level](torch.cat([h, self.levels[level](codes[:, level])], dim=-1))
        return h


class ConditionModel(nn.Module):
    """All conditions -> (vector [B, dim], tokens [B, K, dim]); (None, None) without conditions.

    `keep` [B, K] bool selects per row and condition the real embedding (True) or the learned
    null embedding (False): dropped in training with probability p, and the unconditional branch
    of classifier-free guidance. Missing labels map to the null embedding as well, so a cell
    without a value for an attribute is treated as unconditional in it.
    """

    def __init__(self, codec: ConditionCodec, dim: int, set_layers: int = 1, set_heads: int = 4):
        super().__init__()
        self.names = codec.names
        self.kinds = [s.kind for s in codec.specs]
        embedders = {}
        for spec in codec.specs:
            sizes = codec.sizes(spec)
            if spec.kind == "categorical":
                embedders[spec.name] = CategoricalEmbedder(sizes[0], dim)
            elif spec.kind == "multi_component":
                embedders[spec.name] = MultiComponentEmbedder(sizes, len(spec.continuous), dim)
            elif spec.kind == "set":
                embedders[spec.name] = SetEmbedder(sizes[0], dim, set_layers, set_heads)
            else:
                embedders[spec.name] = HierarchicalEmbedder(sizes, dim)
        self.embedders = nn.ModuleDict(embedders)
        self.sizes = {s.name: codec.sizes(s) for s in codec.specs}
        k = len(self.names)
        self.null = nn.Parameter(torch.randn(max(k, 1), dim) * 0.02)
        self.combine = nn.Sequential(nn.Linear(k * dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if k else None

    @property
    def n_conditions(self) -> int:
        return len(self.names)

    def missing(self, batch) -> torch.Tensor:
        """[B, K] True where a row has no value at all for a condition (maps to null)."""
        cols = []
        for name, kind in zip(self.names, self.kinds):
            if kind == "categorical":
                cols.append(batch[f"{name}.label"] == self.sizes[name][0])
            elif kind == "hierarchical":
                sizes = torch.as_tensor(self.sizes[name], device=batch[f"{name}.levels"].device)
                cols.append((batch[f"{name}.levels"] == sizes).all(dim=1))
            elif kind == "multi_component":
                sizes = torch.as_tensor(self.sizes[name], device=batch[f"{name}.parts"].device) + 1
                none = (batch[f"{name}.parts"] == sizes).all(dim=1)
                if batch[f"{name}.cont_mask"].shape[1]:
                    none &= batch[f"{name}.cont_mask"].sum(1) == 0
                cols.append(none)
            else:
                cols.append(
                    torch.zeros(
                        batch[f"{name}.elements"].shape[0], dtype=torch.bool, device=batch[f"{name}.elements"].device
                    )
                )
        return torch.stack(cols, dim=1)

    def forward(self, batch: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None):
        if not self.names:
            return None, None
        embs = torch.stack([self.embedders[name](batch, name) for name in self.names], dim=1)  # [B, K, dim]
        b = embs.shape[0]
        use = ~self.missing(batch)
        if keep is not None:
            use = use & keep.to(use.device)
        tokens = torch.where(use[..., None], embs, self.null[None].expand(b, -1, -1).to(embs.dtype))
        return self.combine(tokens.reshape(b, -1)), tokens
