"""The `cellfoundry` command. Each stage adds a subcommand: a function `add_<name>(subparsers)`
that registers its parser and sets `func` (called with the parsed arguments)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from cellfoundry.utils import UserError, setup_logging

log = logging.getLogger("cellfoundry")


# ---------------------------------------------------------------------------- embed


def add_embed(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="SE cell embeddings of an .h5ad (like `state emb transform`)",
        description="Tokenize the cells of an .h5ad into SE cell sentences and embed them with an SE model. "
        "The output .h5ad holds the input's obs and var and the embeddings in obsm.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-folder", help="SE model folder (one *.ckpt + protein_embeddings.pt), e.g. SE-600M")
    src.add_argument("--checkpoint", help="SE checkpoint (.ckpt in SE-600M layout)")
    p.add_argument("--gene-embeddings", help="protein_embeddings.pt (default: the one beside the checkpoint)")
    p.add_argument("--input", required=True, help="input .h5ad (counts or log1p in X; genes as var_names)")
    p.add_argument("--output", required=True, help="output .h5ad")
    p.add_argument("--embed-key", default="X_state", help="obsm key of the embeddings (default X_state)")
    p.add_argument("--gene-column", default=None, help="var column with gene symbols (default: var_names)")
    p.add_argument("--batch-size", type=int, default=64, help="cells per inference batch (default 64)")
    p.add_argument("--chunk-size", type=int, default=4096, help="cells tokenized and embedded at a time (default 4096)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of tie-breaks and filler genes (default 0)")
    p.add_argument("--allow-unsafe-pickle", action="store_true", help="load a trusted checkpoint with arbitrary unpickling")
    p.set_defaults(func=run_embed)


def run_embed(args: argparse.Namespace) -> None:
    import anndata as ad

    from cellfoundry.embed import METHOD_FOR_ENCODING, iter_embeddings, write_embedding_h5ad
    from cellfoundry.models.se_checkpoint import load_se
    from cellfoundry.tokenize import tokenize_csr
    from cellfoundry.utils import resolve_device
    from cellfoundry.vocab import explain_poor_match, match_genes

    device = resolve_device(args.device)
    model, cfg, vocab = load_se(args.model_folder or args.checkpoint, args.gene_embeddings, args.allow_unsafe_pickle)
    adata = ad.read_h5ad(args.input, backed="r")
    if args.gene_column is not None and args.gene_column not in adata.var:
        raise UserError(f"--gene-column {args.gene_column!r} is not a var column of {args.input}; columns: {list(adata.var.columns)}")
    symbols = adata.var[args.gene_column].astype(str) if args.gene_column else adata.var_names
    match = match_genes(symbols, vocab)
    if match.n_matched == 0:
        raise UserError(f"none of the genes of {args.input} are in the model's vocabulary: {explain_poor_match(symbols, vocab)}")
    log.info("%d of %d genes are in the vocabulary of %d", match.n_matched, match.n_genes, len(vocab))
    method = METHOD_FOR_ENCODING[cfg.encoding]

    def chunks():
        for start in range(0, adata.n_obs, args.chunk_size):
            stop = min(start + args.chunk_size, adata.n_obs)
            tokens = tokenize_csr(adata.X[start:stop], match.local_to_global, cfg.pad_length, method, args.seed, start)
            yield from iter_embeddings(model, tokens.gene_ids, tokens.values, vocab.table, batch_size=args.batch_size, device=device)

    obs, var = adata.obs.copy(), adata.var.copy()
    # var is kept (as `state emb transform` does) but not X: the output holds embeddings only
    write_embedding_h5ad(args.output, obs, chunks(), cfg.embedding_dim, key=args.embed_key, var=var)
    adata.file.close()
    log.info("wrote %s (%d cells, obsm[%r] %d-d)", args.output, len(obs), args.embed_key, cfg.embedding_dim)


# ---------------------------------------------------------------------------- entry point

SUBCOMMANDS: list[Callable] = [add_embed]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellfoundry", description="cellfoundry command-line tools")
    parser.add_argument("--log", default=None, help="also write the log to this file")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    try:
        args.func(args)
    except UserError as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
