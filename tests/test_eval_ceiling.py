"""The `decoded_real (ceiling)` row of the generation evaluation (issue 16)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellfoundry.evaluate import generation as gen


def _cells(n: int, programs: dict, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.repeat(list(programs), n // len(programs))
    counts = np.vstack([rng.poisson(programs[t]) for t in labels]).astype(np.float32)
    return counts, pd.DataFrame({"cell_type": labels})


def test_ceiling_row_is_scored_beside_the_model_and_references():
    rng = np.random.default_rng(0)
    programs = {t: rng.gamma(1.0, 5.0, size=50) for t in ("T", "B")}
    train, train_obs = _cells(80, programs, 0)
    test, test_obs = _cells(40, programs, 1)
    generated, gen_obs = _cells(40, programs, 2)
    # An over-dispersed "decoder": the test cells' counts with extra multiplicative noise.
    noisy = rng.poisson(test * rng.gamma(0.5, 2.0, size=test.shape)).astype(np.float32)
    kwargs = dict(
        group_columns=["cell_type"], label_column="cell_type", n_hvg=40, n_pcs=8, min_cells_per_group=5, seed=0
    )
    rows, _ = gen.compare_sets(train, train_obs, test, test_obs, generated, gen_obs, ceiling_counts=test, **kwargs)
    table = pd.DataFrame(rows)
    assert set(table["method"]) == {gen.MODEL, gen.REFERENCE_REAL, gen.REFERENCE_WEAK, gen.CEILING}
    exact = table[table["method"] == gen.CEILING].set_index(["condition", "metric"])["value"]
    # Decoding that returns the real test cells scores as the real test cells: zero distance.
    for scope in ("all", "T", "B"):
        assert exact[scope, "mmd_linear"] == 0.0 and exact[scope, "r2_mean"] == 1.0 and exact[scope, "r2_var"] == 1.0
    assert exact["all", "label_accuracy"] > 0.9
    rows, _ = gen.compare_sets(train, train_obs, test, test_obs, generated, gen_obs, ceiling_counts=noisy, **kwargs)
    worse = pd.DataFrame(rows).query("method == @gen.CEILING and condition == 'all'").set_index("metric")["value"]
    assert worse["r2_var"] < 0.9 and worse["mmd_linear"] > 0.0
    # Without latents the row is absent (the script lists it as skipped).
    rows, _ = gen.compare_sets(train, train_obs, test, test_obs, generated, gen_obs, **kwargs)
    assert gen.CEILING not in {r["method"] for r in rows}
