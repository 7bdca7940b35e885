"""Scoring the prediction of a held-out combination (cellfoundry.evaluate.prediction)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import mannwhitneyu

from cellfoundry.evaluate import prediction as pred
from cellfoundry.plots import plot_prediction
from cellfoundry.split import control_labels
from cellfoundry.utils import UserError

COMBO = {"cell_type": "A", "condition": "stim"}
NONE = {"cell_type": "ctrl", "condition": "ctrl"}  # one multi_component condition over both columns


def dataset(seed=0, n=30, genes=60, up=10):
    """Types A, B, C x ctrl/stim, n cells each; stimulation multiplies genes 0..up-1 by 3..12
    (the same in every type); A+stim is the held-out combination."""
    rng = np.random.default_rng(seed)
    types, conds = np.repeat(["A", "B", "C"], 2 * n), np.tile(np.repeat(["ctrl", "stim"], n), 3)
    base = rng.gamma(2.0, 2.0, size=genes) * np.where(types[:, None] == "B", 1.5, 1.0)
    fold = np.ones(genes)
    fold[:up] = np.linspace(3, 12, up)
    rate = base * np.where(conds[:, None] == "stim", fold, 1.0)
    counts = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame({"cell_type": types, "condition": conds})
    return counts, obs, ((obs["cell_type"] == "A") & (obs["condition"] == "stim")).to_numpy()


def score(counts, obs, held, generated, n_de=10):
    gen_obs = pd.DataFrame({"cell_type": ["A"] * len(generated), "condition": ["stim"] * len(generated)})
    rows, _ = pred.evaluate_combination(
        counts, obs, held, generated, gen_obs, COMBO, NONE, n_de_genes=n_de, n_hvg=2000, n_pcs=10
    )
    return pd.DataFrame(rows).set_index(["method", "metric"])["value"]


def test_no_change_de_r2_matches_an_independent_computation():
    counts, obs, held = dataset()
    table = score(counts, obs, held, counts[held])
    # independently: log1p(CP10k) by hand, DE genes by Mann-Whitney U (the order of scanpy's
    # Wilcoxon z without tie correction), R^2 = 1 - SS_res / SS_tot of the real means
    c = counts.astype(np.float64)
    logx = np.log1p(c / c.sum(1, keepdims=True) * 1e4)
    control = (obs["cell_type"] == "A").to_numpy() & (obs["condition"] == "ctrl").to_numpy()
    u = np.array([mannwhitneyu(logx[held, g], logx[control, g]).statistic for g in range(counts.shape[1])])
    de = np.argsort(-u, kind="stable")[:10]
    assert set(de) == set(range(10))  # the data's DE genes, so the check tests the selection too
    real, guess = logx[held].mean(0)[de], logx[control].mean(0)[de]
    expected = 1 - ((real - guess) ** 2).sum() / ((real - real.mean()) ** 2).sum()
    assert table[(pred.NO_CHANGE, "r2_de")] == pytest.approx(expected, rel=1e-9)
    assert table[(pred.NO_CHANGE, "r2_de")] < 0.5  # no change misses the response


def test_a_perfect_prediction_and_the_baselines_rank_as_expected():
    counts, obs, held = dataset()
    table = score(counts, obs, held, counts[held])
    # the held-out cells themselves as the prediction: identical means and sets
    assert table[(pred.MODEL, "r2_all")] == pytest.approx(1.0) and table[(pred.MODEL, "r2_de")] == pytest.approx(1.0)
    assert table[(pred.MODEL, "energy")] == pytest.approx(0.0, abs=1e-9)
    assert table[(pred.MODEL, "delta_pearson_de")] == pytest.approx(1.0)
    # the stimulus acts the same in every type here, so the linear shift nearly recovers it
    assert table[(pred.LINEAR, "r2_de")] > 0.9 > table[(pred.NO_CHANGE, "r2_de")]
    assert np.isnan(table[(pred.NO_CHANGE, "delta_pearson_de")])  # it predicts no change at all
    assert table[(pred.CEILING, "r2_de")] > 0.8
    # control cells generated: as good as no change on the mean
    control = (obs["cell_type"] == "A").to_numpy() & (obs["condition"] == "ctrl").to_numpy()
    table = score(counts, obs, held, counts[control])
    assert table[(pred.MODEL, "r2_de")] == pytest.approx(table[(pred.NO_CHANGE, "r2_de")])


def test_a_combination_without_a_control_label_is_refused():
    counts, obs, held = dataset()
    with pytest.raises(UserError, match="has no control to predict from"):
        control_labels(obs, COMBO, {})
    assert control_labels(obs, COMBO, NONE) == {"cell_type": "A", "condition": "ctrl"}


def test_the_plot_has_a_row_per_combination(tmp_path):
    counts, obs, held = dataset()
    gen_obs = pd.DataFrame({"cell_type": ["A"] * int(held.sum()), "condition": ["stim"] * int(held.sum())})
    _, means = pred.evaluate_combination(counts, obs, held, counts[held], gen_obs, COMBO, NONE, n_de_genes=10, n_pcs=10)
    path = tmp_path / "scatter.png"
    plot_prediction(
        path, {"A stim": means, "A stim again": means}, [f"g{i}" for i in range(counts.shape[1])], pred.METHODS
    )
    from PIL import Image

    width, height = Image.open(path).size
    assert path.read_bytes()[:4] == b"\x89PNG" and height > 0.4 * width  # 2 rows of 4 panels
