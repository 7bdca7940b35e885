"""Reading and writing SE checkpoints in the SE-600M layout (Lightning-style `.ckpt`).

A checkpoint is a dict with `state_dict` (SE parameter names, see models/se.py),
`hyper_parameters` (the reference's constructor arguments plus `cfg`, an OmegaConf DictConfig),
`cfg_yaml` (the same config as YAML text) and `pytorch-lightning_version`. Files are opened with
`torch.load(weights_only=True)` and an explicit allow-list of the OmegaConf classes such files
contain; arbitrary unpickling only with `allow_unsafe_pickle=True`.
"""

from __future__ import annotations

import logging
import os
import pickle
import typing
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from cellfoundry.checkpoints import load_checkpoint, save_checkpoint
from cellfoundry.models.se import SEConfig, StateEmbedding, embedding_keys
from cellfoundry.utils import UserError

log = logging.getLogger(__name__)

GENE_EMBEDDINGS_NAME = "protein_embeddings.pt"
#: Lightning version string written into our checkpoints (the reference reads it back).
LIGHTNING_VERSION = "2.5.0"
#: Prefixes of keys that only the reference's training uses; loading ignores them on purpose.
TRAINING_ONLY_PREFIXES = ("gene_embedding_layer.", "binary_decoder.", "dataset_encoder.", "pe_embedding.")


def _omegaconf_safe_globals() -> list:
    """Classes a pickled OmegaConf DictConfig (as in SE-600M checkpoints) is made of."""
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    return [
        DictConfig,
        ListConfig,
        ContainerMetadata,
        Metadata,
        nodes.AnyNode,
        nodes.StringNode,
        nodes.IntegerNode,
        nodes.FloatNode,
        nodes.BooleanNode,
        nodes.EnumNode,
        nodes.PathNode,
        nodes.BytesNode,
        nodes.ValueNode,
        typing.Any,
        dict,
        list,
        tuple,
        int,
        float,
        bool,
        str,
        defaultdict,
    ]


def read_checkpoint_file(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict:
    """torch.load a checkpoint on the CPU, safely unless `allow_unsafe_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SE checkpoint {path} does not exist; fix se.model_folder / --checkpoint.")
    # mmap: tensors are paged in when used, so reading only the config of a 2.4 GB file is cheap
    mmap = zipfile.is_zipfile(path)
    if allow_unsafe_pickle:
        log.warning("loading %s with arbitrary unpickling (allow_unsafe_pickle=True)", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        return load_checkpoint(path, allowed=_omegaconf_safe_globals(), mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} holds objects outside the allow-list of safe classes ({err}). Only if you trust "
            "the file, load it with allow_unsafe_pickle=True (CLI: --allow-unsafe-pickle)."
        ) from err


def _checkpoint_cfg(ckpt: dict) -> dict:
    """The model config stored in a checkpoint as a plain dict ({} when there is none)."""
    if isinstance(ckpt.get("cfg_yaml"), str):
        return yaml.safe_load(ckpt["cfg_yaml"]) or {}
    cfg = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False)


def config_from_checkpoint(ckpt: dict) -> SEConfig:
    """SEConfig from the checkpoint's config; widths are checked against the weights later."""
    cfg = _checkpoint_cfg(ckpt)
    hp = ckpt.get("hyper_parameters") or {}
    model_cfg = cfg.get("model", {}) or {}
    state = ckpt["state_dict"]
    values = {
        "token_dim": (cfg.get("tokenizer") or {}).get("token_dim", hp.get("token_dim")),
        "d_model": model_cfg.get("emsize", hp.get("d_model")),
        "nhead": model_cfg.get("nhead", hp.get("nhead")),
        "nlayers": model_cfg.get("nlayers", hp.get("nlayers")),
        "output_dim": model_cfg.get("output_dim", hp.get("output_dim")),
        "pad_length": (cfg.get("dataset") or {}).get("pad_length", 2048),
        "encoding": (cfg.get("cellfoundry") or {}).get("encoding", "se"),
    }
    # d_hid is read from the weights: the config's value is not always the trained one.
    if "transformer_encoder.layers.0.linear1.weight" in state:
        values["d_hid"] = int(state["transformer_encoder.layers.0.linear1.weight"].shape[0])
    else:
        values["d_hid"] = model_cfg.get("d_hid", hp.get("d_hid"))
    if "dataset_encoder.4.weight" in state:
        values["num_datasets"] = int(state["dataset_encoder.4.weight"].shape[0])
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise UserError(f"the checkpoint's config does not give {', '.join(missing)}; is it an SE checkpoint?")
    return SEConfig(**values)


def check_state_dict(state: dict[str, torch.Tensor], cfg: SEConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strictly check the embedding weights: every expected key present with its shape.

    Returns (embedding weights, names of the ignored training-only/unknown keys)."""
    expected = embedding_keys(cfg)
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(
            f"SE checkpoint lacks {len(missing)} embedding weight(s): {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. It is not an SE model of this architecture."
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise UserError(f"SE checkpoint weights have the wrong shape: {'; '.join(wrong[:8])}.")
    ignored = sorted(k for k in state if k not in expected)
    unknown = [k for k in ignored if not k.startswith(TRAINING_ONLY_PREFIXES)]
    if unknown:
        log.warning("ignoring %d unknown checkpoint key(s): %s", len(unknown), ", ".join(unknown[:8]))
    return {k: state[k] for k in expected}, ignored


def _resolve_paths(path_or_folder: str | os.PathLike, gene_embeddings: str | os.PathLike | None) -> tuple[Path, Path]:
    path = Path(path_or_folder)
    if path.is_dir():
        ckpts = sorted(path.glob("*.ckpt"))
        if not ckpts:
            raise UserError(f"SE model folder {path} has no .ckpt file; point se.model_folder at an SE model folder.")
        if len(ckpts) > 1:
            log.warning(
                "%s holds %d checkpoints; using %s (pass the file itself to choose)", path, len(ckpts), ckpts[-1].name
            )
        ckpt_path = ckpts[-1]
        folder = path
    else:
        ckpt_path, folder = path, path.parent
    if gene_embeddings is None:
        gene_embeddings = folder / GENE_EMBEDDINGS_NAME
        if not gene_embeddings.is_file():
            raise UserError(
                f"no gene embeddings for {ckpt_path}: expected {gene_embeddings} beside it, "
                "or pass them explicitly (--gene-embeddings)."
            )
    gene_embeddings = Path(gene_embeddings)
    if not gene_embeddings.is_file():
        raise UserError(f"gene embeddings file {gene_embeddings} does not exist.")
    return ckpt_path, gene_embeddings


def load_se(
    path_or_folder: str | os.PathLike,
    gene_embeddings: str | os.PathLike | None = None,
    allow_unsafe_pickle: bool = False,
):
    """Load an SE model from an SE model folder (one .ckpt + protein_embeddings.pt) or a .ckpt.

    Returns (StateEmbedding in eval mode on the CPU, SEConfig, GeneVocab). The gene embeddings
    default to protein_embeddings.pt beside the checkpoint.
    """
    from cellfoundry.vocab import GeneVocab

    ckpt_path, emb_path = _resolve_paths(path_or_folder, gene_embeddings)
    ckpt = read_checkpoint_file(ckpt_path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{ckpt_path} is not a Lightning checkpoint with a state_dict.")
    cfg = config_from_checkpoint(ckpt)
    weights, ignored = check_state_dict(ckpt["state_dict"], cfg)
    if ignored:
        log.info("ignored %d training-only checkpoint keys (%s ...)", len(ignored), ignored[0])
    with torch.device("meta"):
        model = StateEmbedding(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    model.float().eval()
    vocab = GeneVocab.load(emb_path)
    if vocab.table.shape[1] != cfg.token_dim:
        raise UserError(
            f"gene embeddings {emb_path} are {vocab.table.shape[1]}-d but the checkpoint expects "
            f"token_dim {cfg.token_dim}; use the gene embeddings the model was trained with."
        )
    log.info("loaded SE model %s (%s) with %d genes from %s", ckpt_path, cfg, len(vocab.symbols), emb_path)
    return model, cfg, vocab


def reference_cfg(
    cfg: SEConfig, gene_embeddings: str | None = None, n_genes: int = 0, extra: dict | None = None
) -> dict:
    """The reference's config tree for `cfg` (what its loader and `state emb transform` read)."""
    tree: dict[str, Any] = {
        "embeddings": {
            "current": "cellfoundry",
            "cellfoundry": {
                "all_embeddings": gene_embeddings,
                "ds_emb_mapping": None,
                "valid_genes_masks": None,
                "size": cfg.token_dim,
                "num": n_genes,
            },
        },
        "dataset": {
            "name": "vci",
            "seed": 42,
            "current": "cellfoundry",
            "cellfoundry": {"ds_type": "h5ad", "num_datasets": cfg.num_datasets, "filter": True},
            "pad_length": cfg.pad_length,
            "pad_token_idx": 0,
            "cls_token_idx": 3,
            "chrom_token_right_idx": 2,
            "P": 512,
            "N": 512,
            "S": 512,
        },
        "tokenizer": {"token_dim": cfg.token_dim},
        "model": {
            "name": "vci",
            "batch_size": 32,
            "emsize": cfg.d_model,
            "d_hid": cfg.d_hid,
            "nhead": cfg.nhead,
            "nlayers": cfg.nlayers,
            "dropout": cfg.dropout,
            "output_dim": cfg.output_dim,
            "use_flash_attention": True,
            "rda": True,
            "counts": True,
            "dataset_correction": True,
            "num_downsample": 1,
            "batch_tabular_loss": False,
        },
        "task": {"mask": 0.0},
        "loss": {"name": "tabular", "apply_normalization": False, "kernel": "energy"},
        "optimizer": {"max_lr": 1e-4, "weight_decay": 0.01, "start": 0.33, "end": 1.0},
        "cellfoundry": {"encoding": cfg.encoding},
    }
    for key, value in (extra or {}).items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    return tree


def save_se(
    path: str | os.PathLike,
    model: StateEmbedding,
    cfg: SEConfig,
    training_state: dict[str, torch.Tensor] | None = None,
    gene_embeddings: str | None = None,
    gene_table: torch.Tensor | None = None,
    cfg_extra: dict | None = None,
) -> None:
    """Write `model` as a checkpoint in the SE-600M layout, atomically.

    `training_state` adds training-head weights (binary_decoder.*, dataset_encoder.*); the
    reference's alias `gene_embedding_layer.*` of the encoder and `pe_embedding.weight`
    (`gene_table`) are written so the reference's loader finds every key it builds.
    """
    from omegaconf import OmegaConf

    state = {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items()}
    for key in ("0.weight", "0.bias", "1.weight", "1.bias"):
        state[f"gene_embedding_layer.{key}"] = state[f"encoder.{key}"].clone()
    if gene_table is not None:
        state["pe_embedding.weight"] = gene_table.detach().cpu().float().clone()
    for key, value in (training_state or {}).items():
        state[key] = value.detach().cpu().float().clone()
    n_genes = 0 if gene_table is None else int(gene_table.shape[0])
    tree = reference_cfg(cfg, gene_embeddings, n_genes, cfg_extra)
    ckpt = {
        "state_dict": state,
        "hyper_parameters": {
            "token_dim": cfg.token_dim,
            "d_model": cfg.d_model,
            "nhead": cfg.nhead,
            "d_hid": cfg.d_hid,
            "nlayers": cfg.nlayers,
            "output_dim": cfg.output_dim,
            "dropout": cfg.dropout,
            "warmup_steps": 0,
            "compiled": False,
            "max_lr": tree["optimizer"]["max_lr"],
            "emb_cnt": n_genes,
            "emb_size": cfg.token_dim,
            "cfg": OmegaConf.create(tree),
            "collater": None,
        },
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "cfg_yaml": yaml.safe_dump(tree, sort_keys=False),
    }
    save_checkpoint(path, ckpt)


def link_checkpoint(folder: str | os.PathLike, link: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Path:
    """Make `link` a symbolic link to the SE checkpoint in `folder` after checking it opens and
    holds every embedding weight. Returns the checkpoint's path."""
    ckpt_path, _ = _resolve_paths(folder, None)
    ckpt = read_checkpoint_file(ckpt_path, allow_unsafe_pickle=allow_unsafe_pickle)
    check_state_dict(ckpt["state_dict"], config_from_checkpoint(ckpt))
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(ckpt_path.resolve())
    os.replace(tmp, link)
    return ckpt_path
