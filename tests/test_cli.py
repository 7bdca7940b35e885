"""`cellfoundry embed`: every input format the workflow reads, one-line user errors (exit 2, the
traceback only with --debug), one progress count over all chunks, and the provenance record."""

from __future__ import annotations

import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from test_embed import CKPT, FIXTURE, GENES, REFERENCE
from test_io import write_10x_h5, write_10x_mtx

from cellfoundry.cli import main as cli_main
from cellfoundry.provenance import read_provenance
from cellfoundry.utils import file_sha256
from cellfoundry.vocab import GeneVocab, match_genes

MODEL = ["--checkpoint", str(CKPT), "--gene-embeddings", str(GENES), "--device", "cpu"]


def cells() -> ad.AnnData:
    adata = ad.read_h5ad(FIXTURE / "cells.h5ad")
    adata.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(adata.n_vars)]  # the 10x writers need them
    return adata


def embed(tmp_path, input_path, *extra: str, model=MODEL) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, output path)."""
    out = tmp_path / "out.h5ad"
    return cli_main(["embed", *model, "--input", str(input_path), "--output", str(out), *extra]), out


@pytest.mark.parametrize("fmt", ["10x_h5", "10x_mtx", "zarr"])
def test_embeds_every_input_format(tmp_path, fmt):
    adata = cells()
    path = {"10x_h5": tmp_path / "cells.h5", "10x_mtx": tmp_path / "mtx", "zarr": tmp_path / "cells.zarr"}[fmt]
    {"10x_h5": write_10x_h5, "10x_mtx": write_10x_mtx, "zarr": lambda a, p: a.write_zarr(p)}[fmt](adata, path)
    code, out = embed(tmp_path, path, "--batch-size", "3")
    assert code == 0
    result = ad.read_h5ad(out)
    assert list(result.obs_names) == list(adata.obs_names) and result.n_vars == adata.n_vars
    np.testing.assert_allclose(result.obsm["X_state"], REFERENCE, atol=1e-5)


def test_gene_symbols_from_a_var_column_of_a_streamed_h5ad(tmp_path):
    adata = cells()
    adata.var["symbol"] = adata.var_names
    adata.var_names = adata.var["gene_ids"].to_numpy()
    adata.write_h5ad(tmp_path / "ids.h5ad")
    code, out = embed(tmp_path, tmp_path / "ids.h5ad", "--gene-symbols", "symbol", "--chunk-size", "5")
    assert code == 0
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_state"], REFERENCE, atol=1e-5)


def test_progress_counts_all_chunks_and_output_records_provenance(tmp_path, capsys):
    code, out = embed(
        tmp_path, FIXTURE / "cells.h5ad", "--chunk-size", "3", "--batch-size", "2", "--progress-every", "0"
    )
    assert code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "embedded " in line]
    done = [int(re.search(r"embedded (\d+) / 8 cells", line).group(1)) for line in lines]
    assert done == [2, 3, 5, 6, 8]  # one count over chunks of 3 cells (batches 2+1, 2+1, 2): no restart
    assert "cells/s, ETA" in lines[0] and "(100%)" in lines[-1] and "done in" in lines[-1]
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_state"], REFERENCE, atol=1e-5)

    record = read_provenance(out)
    assert record["stage"] == "cli_embed" and record["version"]
    assert record["checkpoints"]["se"]["sha256"] == file_sha256(CKPT)
    assert record["vocab"]["sha256"] == file_sha256(GENES)
    assert record["inputs"]["input"]["size_bytes"] == (FIXTURE / "cells.h5ad").stat().st_size
    assert record["config"]["chunk_size"] == 3 and record["config"]["counts"] == "X"


def test_duplicated_gene_counts_once():
    vocab = GeneVocab.load(GENES)
    match = match_genes(["GENE1", "GENE1", "GENE2", "NOT_A_GENE"], vocab)
    assert match.n_matched == 2 and match.n_genes == 4


def _write(tmp_path, name, edit):
    adata = cells()
    adata = edit(adata)
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _write_zarr(tmp_path, edit):
    path = tmp_path / "cells.zarr"
    edit(cells()).write_zarr(path)
    return path


def _negative(a):
    a.X = a.X.toarray()
    a.X[7, 1] = -3
    return a


def _log1p(a):
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))
    return a


def _unknown_genes(a):
    a.var_names = [f"OTHER{i}" for i in range(a.n_vars)]
    return a


def _truncated(tmp_path):
    data = (FIXTURE / "cells.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.h5ad"


ERRORS = {
    "missing input": (lambda t: t / "nope.h5ad", [], "--input"),
    "truncated file": (_truncated, [], "could not read"),
    "zero cells": (lambda t: _write(t, "empty.h5ad", lambda a: a[:0].copy()), [], "holds 0 cells"),
    "zero cells (zarr)": (lambda t: _write_zarr(t, lambda a: a[:0].copy()), [], "zero cells"),
    "log1p values (zarr)": (lambda t: _write_zarr(t, _log1p), [], "non-integer"),
    # an .h5ad is checked chunk by chunk as it streams: the chunk is named
    "negative values": (
        lambda t: _write(t, "neg.h5ad", _negative),
        ["--chunk-size", "3"],
        "1 negative values in cells 6..7",
    ),
    "log1p values": (lambda t: _write(t, "log.h5ad", _log1p), [], "non-integer"),
    "unknown layer": (lambda t: FIXTURE / "cells.h5ad", ["--counts", "raw_counts"], "--counts"),
    "unknown gene column": (lambda t: FIXTURE / "cells.h5ad", ["--gene-symbols", "nope"], "--gene-symbols"),
    "no known genes": (lambda t: _write(t, "other.h5ad", _unknown_genes), [], "--gene-symbols"),
    "missing model folder": (lambda t: FIXTURE / "cells.h5ad", ["--model-folder", "/nonexistent"], "no such folder"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, case):
    make_input, extra, words = ERRORS[case]
    model = MODEL[-2:] if "--model-folder" in extra else MODEL  # folder instead of checkpoint
    code, out = embed(tmp_path, make_input(tmp_path), *extra, model=model)
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]  # one line, the last one
    assert words in errors[0], errors[0]


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _ = embed(tmp_path, tmp_path / "nope.h5ad", "--debug")
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError: --input" in err


def test_output_must_be_an_h5ad_file(tmp_path, capsys):
    (tmp_path / "out_dir").mkdir()
    code = cli_main(["embed", *MODEL, "--input", str(FIXTURE / "cells.h5ad"), "--output", str(tmp_path / "out_dir")])
    assert code == 2 and (tmp_path / "out_dir").is_dir()  # never replaced by the output
    assert "ending in .h5ad" in capsys.readouterr().err


def test_an_unwritable_output_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out.h5ad"  # its folder cannot be made
    assert cli_main(["embed", *MODEL, "--input", str(FIXTURE / "cells.h5ad"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "check the path" in err.splitlines()[-1]


def test_installed_command_exits_2_without_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "cellfoundry.cli",
        "embed",
        *MODEL,
        "--input",
        str(tmp_path / "missing.zarr"),
        "--output",
        str(tmp_path / "o.h5ad"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no such file or folder" in proc.stderr
