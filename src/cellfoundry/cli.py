"""The `cellfoundry` command. Each stage adds a subcommand: a function `add_<name>(subparsers)`
that registers its parser and sets `func` (called with the parsed arguments)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from cellfoundry.utils import UserError, setup_logging

log = logging.getLogger("cellfoundry")


# ---------------------------------------------------------------------------- embed


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_embed(subparsers) -> None:
    from cellfoundry.io import FORMATS

    p = subparsers.add_parser(
        "embed",
        help="SE cell embeddings of a count matrix (like `state emb transform`)",
        description="Tokenize the cells of a raw count matrix (.h5ad, 10x .h5, 10x Matrix Market folder or .zarr, "
        "as the workflow reads them) into SE cell sentences and embed them with an SE model. The output .h5ad "
        "holds the input's obs and var, the embeddings in obsm and the provenance record in uns['cellfoundry'].",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-folder", help="SE model folder (one *.ckpt + protein_embeddings.pt), e.g. SE-600M")
    src.add_argument("--checkpoint", help="SE checkpoint (.ckpt in SE-600M layout)")
    p.add_argument("--gene-embeddings", help="protein_embeddings.pt (default: the one beside the checkpoint)")
    p.add_argument("--input", required=True, help="raw integer counts: .h5ad, 10x .h5, 10x mtx folder or .zarr")
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto", help="input format (default: from the name)")
    p.add_argument("--counts", default="X", help="where the raw counts are: X, raw or a layer name (default X)")
    p.add_argument(
        "--gene-symbols",
        "--gene-column",
        dest="gene_symbols",
        default=None,
        help="var column with gene symbols (default: var_names)",
    )
    p.add_argument("--output", required=True, help="output .h5ad")
    p.add_argument("--embed-key", default="X_state", help="obsm key of the embeddings (default X_state)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="cells per inference batch (default 64)")
    p.add_argument(
        "--chunk-size", type=_positive_int, default=4096, help="cells tokenized and embedded at a time (default 4096)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of tie-breaks and filler genes (default 0)")
    p.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="log a progress line every SECONDS (default 30)",
    )
    p.add_argument(
        "--allow-unsafe-pickle", action="store_true", help="load a trusted checkpoint with arbitrary unpickling"
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    p.set_defaults(func=run_embed)


_FLAGS = {"path": "--input", "format": "--format", "counts": "--counts", "gene_symbols": "--gene-symbols"}
# "the dataset's `counts`", "`gene_symbols: x`", "datasets.<name>.gene_symbols: x"
_DATASET_KEY = re.compile(r"(?:the dataset's )?(?:`(\w+)(?:: ([^`]*))?`|datasets\.<name>\.(\w+)(?=[: ]))")


def _in_cli_terms(message: str) -> UserError:
    """The readers' messages name the workflow's dataset keys; the CLI's flags replace them."""

    def flag(m: re.Match) -> str:
        key = m.group(1) or m.group(3)
        if key not in _FLAGS:
            return m.group(0)
        return _FLAGS[key] + (f" {m.group(2)}" if m.group(2) else "")

    return UserError(_DATASET_KEY.sub(flag, message).replace("--gene-symbols:", "--gene-symbols"))


def _check_embed_paths(args: argparse.Namespace) -> None:
    """Path mistakes, caught before anything is loaded."""
    if args.model_folder and not Path(args.model_folder).is_dir():
        raise UserError(
            f"--model-folder {args.model_folder}: no such folder; point it at an SE model folder "
            "(one .ckpt + protein_embeddings.pt), or pass a checkpoint file with --checkpoint."
        )
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UserError(
            f"--checkpoint {args.checkpoint}: no such file; "
            "pass an SE .ckpt file, or a model folder with --model-folder."
        )
    if args.gene_embeddings and not Path(args.gene_embeddings).is_file():
        raise UserError(
            f"--gene-embeddings {args.gene_embeddings}: no such file; pass the model's protein_embeddings.pt."
        )
    if not Path(args.input).exists():
        raise UserError(f"--input {args.input}: no such file or folder; check the path.")
    out = Path(args.output)
    if out.suffix != ".h5ad" or out.is_dir():
        raise UserError(f"--output {args.output} is not an .h5ad file name; give a path ending in .h5ad.")
    if out.exists() and out.resolve() == Path(args.input).resolve():
        raise UserError(f"--output {args.output} is the input; write the embeddings to another file.")


def _open_counts(args: argparse.Namespace):
    """(AnnData with X = raw counts and gene symbols as var_names, rows(start, stop) -> counts).

    An .h5ad with the counts in X is read backed, chunk by chunk, so memory does not grow with
    the number of cells, and each chunk is checked for raw counts as it is read; any other input
    is read whole and checked by load_counts, as the workflow's QC reads it."""
    import anndata as ad

    from cellfoundry.io import count_problem, detect_format, load_counts

    fmt = detect_format(args.input) if args.format == "auto" else args.format
    if fmt != "h5ad" or args.counts != "X":
        try:
            adata = load_counts(args.input, args.format, args.counts, args.gene_symbols)
        except UserError as err:
            raise _in_cli_terms(str(err)) from err
        return adata, lambda start, stop: adata.X[start:stop]
    try:
        adata = ad.read_h5ad(args.input, backed="r")
    except Exception as exc:  # a reader's own error: say which file failed
        raise UserError(
            f"could not read {args.input} as h5ad: {exc}. Check that the file is complete, "
            "or pass --format for another format."
        ) from exc
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise UserError(
            f"{args.input} holds {adata.n_obs} cells x {adata.n_vars} genes; check that it is the right file."
        )
    if args.gene_symbols is not None:
        if args.gene_symbols not in adata.var.columns:
            raise UserError(
                f"--gene-symbols {args.gene_symbols} is not a var column of {args.input}; var columns are "
                f"{list(adata.var.columns) or 'none'} (leave it out to use var_names)."
            )
        adata.var_names = adata.var[args.gene_symbols].astype(str).to_numpy()
    if adata.var_names.has_duplicates:  # as load_counts: a repeated symbol matches once
        log.warning("gene names occur more than once; made unique by appending -1, -2, ...")
        adata.var_names_make_unique()

    def rows(start: int, stop: int):
        counts = adata.X[start:stop]
        problem = count_problem(counts)
        if problem:
            raise UserError(
                f"{args.input} (X) is not a raw count matrix: {problem} in cells {start}..{stop - 1}. "
                "Point --input at the raw (unnormalised) count matrix, or name the layer holding it in --counts."
            )
        return counts

    return adata, rows


def run_embed(args: argparse.Namespace) -> None:
    from cellfoundry.models.se_checkpoint import _resolve_paths, load_se
    from cellfoundry.progress import Progress
    from cellfoundry.provenance import KEY, provenance
    from cellfoundry.se.data import METHOD_FOR_ENCODING
    from cellfoundry.se.embed import iter_embeddings, write_embedding_h5ad
    from cellfoundry.tokenize import tokenize_csr
    from cellfoundry.utils import resolve_device
    from cellfoundry.vocab import explain_poor_match, match_genes

    _check_embed_paths(args)
    device = resolve_device(args.device)
    ckpt_path, genes_path = _resolve_paths(args.model_folder or args.checkpoint, args.gene_embeddings)
    model, cfg, vocab = load_se(ckpt_path, genes_path, args.allow_unsafe_pickle)
    adata, counts = _open_counts(args)
    log.info("read %d cells x %d genes from %s", adata.n_obs, adata.n_vars, args.input)
    symbols = list(adata.var_names)
    match = match_genes(symbols, vocab)
    if match.n_matched == 0:
        columns = {c: adata.var[c] for c in adata.var.columns if adata.var[c].dtype.kind not in "biufc"}
        raise _in_cli_terms(
            f"none of the genes of {args.input} are in the model's vocabulary: "
            f"{explain_poor_match(symbols, vocab, columns)}. Name a var column of gene symbols "
            "with --gene-symbols, or use a model whose vocabulary holds these genes."
        )
    log.info("%d of %d genes are in the vocabulary of %d", match.n_matched, match.n_genes, len(vocab))
    method = METHOD_FOR_ENCODING[cfg.encoding]
    progress = Progress(adata.n_obs, args.progress_every)  # one count over all chunks

    def chunks():
        for start in range(0, adata.n_obs, args.chunk_size):
            stop = min(start + args.chunk_size, adata.n_obs)
            tokens = tokenize_csr(counts(start, stop), match.local_to_global, cfg.pad_length, method, args.seed, start)
            yield from iter_embeddings(
                model,
                tokens.gene_ids,
                tokens.values,
                vocab.table,
                batch_size=args.batch_size,
                device=device,
                progress=progress,
            )

    settings = {k: v for k, v in vars(args).items() if k not in ("func", "debug", "log")}
    record = provenance(
        "cli_embed", settings, checkpoints={"se": ckpt_path}, vocab=genes_path, inputs={"input": args.input}
    )
    # var is kept (as `state emb transform` does) but not X: the output holds embeddings only
    try:
        write_embedding_h5ad(
            args.output, adata.obs, chunks(), cfg.embedding_dim, key=args.embed_key, var=adata.var, uns={KEY: record}
        )
    finally:
        if adata.isbacked:
            adata.file.close()
    log.info("wrote %s (%d cells, obsm[%r] %d-d)", args.output, adata.n_obs, args.embed_key, cfg.embedding_dim)


# ---------------------------------------------------------------------------- entry point

SUBCOMMANDS: list[Callable] = [add_embed]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellfoundry", description="cellfoundry command-line tools")
    parser.add_argument("--log", default=None, help="also write the log to this file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _error(message: str, debug: bool) -> int:
    """A user's error: one line on stderr (the traceback only with --debug), exit code 2."""
    log.error("%s", " ".join(message.split()), exc_info=debug)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    try:
        args.func(args)
    except UserError as err:
        return _error(str(err), args.debug)
    except OSError as err:  # a path given cannot be read or written (permissions, disk full, ...)
        return _error(
            f"{err}; check the path, its permissions and the free space (--debug shows the traceback).", args.debug
        )
    except KeyboardInterrupt:
        log.error("interrupted; no output was written")
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
