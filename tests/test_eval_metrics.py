"""Known-answer tests of the evaluation metrics (no workflow, small arrays, a few seconds)."""

import numpy as np
import pandas as pd
import pytest

from cellfoundry.evaluate import embedding as emb
from cellfoundry.evaluate import generation as gen


def gaussian_blobs(n_per=40, n_labels=3, dim=8, spread=20.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_labels, dim)) * spread
    X = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centers])
    labels = np.repeat([f"type{i}" for i in range(n_labels)], n_per)
    return X, labels


# --- embeddings ---------------------------------------------------------------------------


def test_perfectly_separated_labels_score_one():
    X, labels = gaussian_blobs()
    out = emb.embedding_metrics(X, labels, k=5, resolutions=(0.1, 0.5, 1.0))
    assert out["knn_accuracy"] == 1.0
    assert out["knn_macro_f1"] == 1.0
    assert out["asw_label"] > 0.9
    assert out["nmi"] == pytest.approx(1.0)
    assert out["ari"] == pytest.approx(1.0)


def test_random_labels_score_chance():
    X, _ = gaussian_blobs(n_per=60, n_labels=1, dim=5)
    labels = np.random.default_rng(1).choice(["a", "b", "c"], size=len(X))
    out = emb.knn_label_transfer(X, labels, k=15)
    assert 0.15 < out["knn_accuracy"] < 0.55
    assert emb.asw_label(X, labels) == pytest.approx(0.5, abs=0.05)


def test_batch_scores_mixed_vs_separated():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    labels = np.repeat(["a", "b"], 100)
    batch_mixed = np.tile(["b1", "b2"], 100)
    assert emb.ilisi(X, batch_mixed) > 0.8
    assert emb.kbet_acceptance(X, batch_mixed) > 0.8
    assert emb.asw_batch(X, batch_mixed, labels) > 0.9
    # Batches far apart: no neighbourhood is mixed.
    batch_split = np.where(np.arange(200) % 2 == 0, "b1", "b2")
    X_split = X + np.where(batch_split == "b1", 0.0, 100.0)[:, None]
    assert emb.ilisi(X_split, batch_split) == pytest.approx(0.0, abs=1e-6)
    assert emb.kbet_acceptance(X_split, batch_split) == 0.0
    assert emb.asw_batch(X_split, batch_split, labels) < 0.05


def test_embedding_metrics_skip_batch_without_batches():
    X, labels = gaussian_blobs(n_per=20)
    out = emb.embedding_metrics(X, labels, batches=None, k=5, resolutions=(0.5,))
    assert "ilisi" not in out and "asw_batch" not in out


# --- generated cells ----------------------------------------------------------------------


def test_identical_sets_score_zero_and_auc_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    assert gen.wasserstein(x, x, p=1) == pytest.approx(0.0, abs=1e-9)
    assert gen.wasserstein(x, x, p=2) == pytest.approx(0.0, abs=1e-9)
    assert gen.mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)
    assert gen.mmd_linear(x, x) == pytest.approx(0.0, abs=1e-12)
    assert gen.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert gen.knn_real_vs_generated_auc(x, x.copy()) == pytest.approx(0.5, abs=0.05)
    moments = gen.moment_agreement(x, x)
    assert moments["r2_mean"] == pytest.approx(1.0) and moments["pearson_var"] == pytest.approx(1.0)


def test_same_distribution_auc_near_half():
    rng = np.random.default_rng(0)
    auc = gen.knn_real_vs_generated_auc(rng.normal(size=(400, 4)), rng.normal(size=(400, 4)))
    assert 0.4 < auc < 0.6


def test_shifted_gaussians_match_closed_form_w2():
    # W2 between N(m1, I) and N(m2, I) is |m1 - m2|; with the same noise draws shifted, the
    # optimal plan is the identity and the empirical W2 equals the shift exactly.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 3))
    shift = np.array([3.0, -4.0, 0.0])  # |shift| = 5
    assert gen.wasserstein(x, x + shift, p=2) == pytest.approx(5.0, rel=1e-6)
    assert gen.wasserstein(x, x + shift, p=1) == pytest.approx(5.0, rel=1e-6)
    assert gen.mmd_linear(x, x + shift) == pytest.approx(25.0, rel=1e-9)
    # Independent samples: W2 close to the population value sqrt(|dm|^2 + 0) = 5.
    y = rng.normal(size=(300, 3)) + shift
    assert gen.wasserstein(rng.normal(size=(300, 3)), y, p=2) == pytest.approx(5.0, rel=0.1)


def test_separated_sets_auc_one_and_positive_distances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(60, 4)) + 50
    assert gen.knn_real_vs_generated_auc(x, y) == pytest.approx(1.0)
    assert gen.energy_distance(x, y) > 90
    # Far apart sets: each of the 5 RBF kernels contributes at most 2.
    assert 0 < gen.mmd_rbf(x, y) <= 10


def test_independent_genes_keeps_marginals_breaks_correlation():
    rng = np.random.default_rng(0)
    base = rng.poisson(5, size=(500, 1)).astype(np.float32)
    counts = np.hstack([base, base])  # perfectly correlated genes
    groups = np.array(["a"] * 500)
    out = gen.independent_genes_sample(counts, groups, groups, seed=0)
    assert out.shape == counts.shape
    assert set(np.unique(out)) <= set(np.unique(counts))
    assert abs(out[:, 0].mean() - counts[:, 0].mean()) < 0.5
    assert abs(np.corrcoef(out[:, 0], out[:, 1])[0, 1]) < 0.15


def _toy_counts(n, means, seed):
    rng = np.random.default_rng(seed)
    return rng.poisson(means, size=(n, len(means))).astype(np.float32)


def test_compare_sets_floor_beats_weak_generator():
    rng = np.random.default_rng(0)
    n_genes = 60
    programs = {t: rng.gamma(1.0, 5.0, size=n_genes) for t in ("T", "B")}
    def cells(n, seed):
        labels = np.repeat(["T", "B"], n // 2)
        counts = np.vstack([_toy_counts(1, programs[t], seed + i) for i, t in enumerate(labels)])
        return counts, pd.DataFrame({"cell_type": labels})
    train, train_obs = cells(120, 0)
    test, test_obs = cells(60, 1000)
    generated, gen_obs = cells(60, 5000)
    rows, embedding = gen.compare_sets(train, train_obs, test, test_obs, generated, gen_obs, ["cell_type"], "cell_type",
                                      n_hvg=40, n_pcs=10, min_cells_per_group=10, seed=0)
    table = pd.DataFrame(rows)
    assert set(table["method"]) == {gen.MODEL, gen.REFERENCE_REAL, gen.REFERENCE_WEAK}
    assert {"all", "T", "B", "mean over conditions"} <= set(table["condition"])
    get = lambda m, k, c="all": table.query("method == @m and metric == @k and condition == @c")["value"].item()
    # The model here samples the true distribution: close to the floor, and labels recovered.
    assert get(gen.MODEL, "label_accuracy") > 0.9
    assert get(gen.REFERENCE_REAL, "label_accuracy") > 0.9
    assert get(gen.MODEL, "mmd_rbf", "mean over conditions") < get(gen.REFERENCE_WEAK, "mmd_rbf", "mean over conditions") * 5
    assert embedding["coords"].shape == (120, 10)


def test_metrics_are_deterministic_for_a_seed():
    X, labels = gaussian_blobs(n_per=30, spread=2.0)
    a = emb.embedding_metrics(X, labels, k=5, resolutions=(0.5, 1.0), seed=3)
    b = emb.embedding_metrics(X.copy(), labels, k=5, resolutions=(0.5, 1.0), seed=3)
    assert a == b
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(60, 3)) + 0.5
    assert gen.distribution_metrics(x, y, seed=1) == gen.distribution_metrics(x, y, seed=1)


# --- reconstruction and summary -----------------------------------------------------------


def test_per_gene_pearson_and_observed_log1p():
    from cellfoundry.evaluate import reconstruction as rec

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(50, 4))
    pred = obs.copy()
    pred[:, 1] *= -1  # anti-correlated gene
    pred[:, 3] = 1.0  # constant prediction: undefined
    r = rec.per_gene_pearson(pred, obs)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[3])
    counts = np.array([[1.0, 3.0], [0.0, 0.0]])
    expected = np.log1p(np.array([[0.25, 0.75], [0.0, 0.0]]) * 1e4)
    assert np.allclose(rec.observed_log1p(counts), expected)


def test_summary_marks_model_losses(tmp_path):
    from cellfoundry.evaluate import summary

    pd.DataFrame(
        [dict(method=m, metric="knn_accuracy", value=v) for m, v in (("se", 0.6), ("xpressor", 0.9), ("pca_hvg", 0.8), ("random_se", 0.3))]
    ).to_csv(tmp_path / "embeddings.tsv", sep="\t", index=False)
    text = summary.embedding_table(tmp_path / "embeddings.tsv")
    assert "| se | 0.6 ▼ |" in text and "| xpressor | 0.9 |" in text


# --- unlabelled cells (NaN / empty labels) --------------------------------------------------


def test_nan_labels_are_left_out_of_label_metrics():
    X, labels = gaussian_blobs()
    partly = labels.astype(object)
    partly[::4] = np.nan
    partly[1::8] = ""
    assert emb.unlabelled(partly).sum() == 30 + 15
    # scores on the labelled cells only equal those with the unlabelled cells removed
    keep = ~emb.unlabelled(partly)
    got = emb.embedding_metrics(X, partly, k=5, resolutions=(0.5, 1.0))
    want = emb.embedding_metrics(X[keep], labels[keep], k=5, resolutions=(0.5, 1.0))
    assert got == want
    assert got["knn_accuracy"] == 1.0  # "nan" is no label the classifier could get wrong


def test_unlabelled_data_skips_label_metrics_with_reasons():
    X, labels = gaussian_blobs(n_per=20)
    batches = np.tile(["b1", "b2"], len(X) // 2)
    rows, summary = emb.compare_embeddings({"se": X, "pca": X[:, :4]}, None, batches, model_methods=("se",), k=5, resolutions=(0.5,))
    assert {"knn_accuracy", "asw_label", "nmi", "bio_conservation"} <= set(summary["skipped"])
    assert "cell_type is null" in summary["skipped"]["nmi"]
    assert summary["n_unlabelled"] == len(X) and summary["n_labelled"] == 0
    table = pd.DataFrame(rows)
    assert table.query("metric == 'nmi'")["value"].isna().all() and len(table.query("metric == 'nmi'")) == 2
    assert np.isfinite(summary["scores"]["se"]["ilisi"])  # batch metrics need no labels
    # all labels NaN: the same skip, with the reason counting the cells
    _, summary = emb.compare_embeddings({"se": X}, np.full(len(X), np.nan, dtype=object), None, k=5)
    assert "0 labelled cells" in summary["skipped"]["knn_accuracy"] and "ilisi" in summary["skipped"]


def test_nan_conditions_form_no_group_and_no_condition_mean():
    obs = pd.DataFrame({"ct": ["T", np.nan, "B", "", "T"], "drug": ["a", "a", None, "b", "a"]})
    groups = gen.groups_of(obs, ["ct", "drug"])
    assert groups.tolist() == ["T | a", gen.UNLABELLED, gen.UNLABELLED, gen.UNLABELLED, "T | a"]
    rng = np.random.default_rng(0)
    n_genes = 40
    programs = {t: rng.gamma(1.0, 5.0, size=n_genes) for t in ("T", "B")}

    def cells(n, seed, nan_every):
        labels = np.repeat(["T", "B"], n // 2).astype(object)
        counts = np.vstack([_toy_counts(1, programs[t], seed + i) for i, t in enumerate(labels)])
        labels[::nan_every] = np.nan
        return counts, pd.DataFrame({"cell_type": labels})

    train, train_obs = cells(80, 0, 5)
    test, test_obs = cells(40, 1000, 4)
    generated, gen_obs = cells(40, 5000, 4)
    rows, embedding = gen.compare_sets(train, train_obs, test, test_obs, generated, gen_obs, ["cell_type"], "cell_type",
                                      n_hvg=30, n_pcs=5, min_cells_per_group=5, seed=0)
    table = pd.DataFrame(rows)
    # the unlabelled cells are in "all" only: two condition groups, their mean over those two
    assert set(table["condition"]) == {"all", "T", "B", "mean over conditions"}
    model = table[table["method"] == gen.MODEL]
    per_group = model[model["condition"].isin(["T", "B"])].groupby("metric")["value"].mean()
    mean = model[model["condition"] == "mean over conditions"].set_index("metric")["value"]
    assert mean["w2"] == pytest.approx(per_group["w2"])
    assert model.query("condition == 'all' and metric == 'w2'")["n_cells"].item() == 40
    assert 0.8 < model.query("condition == 'all' and metric == 'label_accuracy'")["value"].item() <= 1.0
    assert gen.UNLABELLED in set(embedding["group"])
    # a classifier never learns, nor is scored on, a missing label: the NaN-labelled training cells
    # sit on the scored cell and would outvote "a"; the unlabelled scored cell is left out
    train_x = np.array([[0.0], [0.1], [0.0], [0.05], [0.02]])
    assert gen.label_accuracy(train_x, ["a", "a", np.nan, "nan", ""], np.zeros((2, 1)), ["a", np.nan], k=5) == 1.0
    assert np.isnan(gen.label_accuracy(train_x, ["a"] * 5, np.zeros((2, 1)), [np.nan, ""]))
