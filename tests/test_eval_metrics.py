"""Known-answer tests of the evaluation metrics (no workflow, small arrays, a few seconds)."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.evaluate import embedding as emb
from cellfoundry.evaluate import generation as gen
from cellfoundry.evaluate.knn import knn_label_transfer


def gaussian_blobs(n_per=40, n_labels=3, dim=8, spread=20.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_labels, dim)) * spread
    X = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centers])
    labels = np.repeat([f"type{i}" for i in range(n_labels)], n_per)
    return X, labels


# --- embeddings ---------------------------------------------------------------------------


def test_perfectly_separated_labels_score_one():
    X, labels = gaussian_blobs()
    out = emb.embedding_metrics(X, labels, k=5, resolutions=(0.2, 0.5, 1.0))
    assert out["knn_accuracy"] == 1.0
    assert out["knn_macro_f1"] == 1.0
    assert out["asw_label"] > 0.9
    assert out["nmi"] == pytest.approx(1.0)
    assert out["ari"] == pytest.approx(1.0)
    assert out["clisi"] == pytest.approx(1.0)  # every neighbourhood holds one label


def test_random_labels_score_chance():
    X, _ = gaussian_blobs(n_per=60, n_labels=1, dim=5)
    labels = np.random.default_rng(1).choice(["a", "b", "c"], size=len(X))
    out = knn_label_transfer(X, labels, k=15)
    assert 0.15 < out["knn_accuracy"] < 0.55
    assert emb.embedding_metrics(X, labels)["asw_label"] == pytest.approx(0.5, abs=0.05)


def test_batch_scores_mixed_vs_separated():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    labels = np.repeat(["a", "b"], 100)
    # Every cell twice, once per batch (the LISIs leave out self, not its twin: not exactly 1)
    twins = emb.embedding_metrics(np.vstack([X, X]), np.tile(labels, 2), np.repeat(["b1", "b2"], 200))
    assert twins["ilisi"] > 0.75 and twins["asw_batch"] > 0.98 and twins["kbet_acceptance"] > 0.9
    mixed = emb.embedding_metrics(X, labels, np.tile(["b1", "b2"], 100), X_pre=X)
    assert mixed["ilisi"] > 0.8 and mixed["kbet_acceptance"] > 0.8 and mixed["asw_batch"] > 0.9
    assert mixed["pcr_comparison"] == 0.0  # the embedding is its own pre-integration embedding
    # Batches far apart: no neighbourhood is mixed; the PCA-like pre-embedding mixed them.
    batch_split = np.where(np.arange(200) % 2 == 0, "b1", "b2")
    X_split = X + np.where(batch_split == "b1", 0.0, 100.0)[:, None]
    split = emb.embedding_metrics(X_split, labels, batch_split, X_pre=X)
    assert split["ilisi"] == pytest.approx(0.0, abs=1e-6)
    assert split["graph_connectivity"] <= 0.5  # each label's graph falls into its two batches
    # scib-metrics' kBET runs on a diffusion map of each label's graph, whose two components
    # blur a little there: not exactly 0
    assert split["kbet_acceptance"] < 0.3 < mixed["kbet_acceptance"]
    assert split["asw_batch"] < 0.05
    assert split["pcr_comparison"] == 0.0  # batch explains more variance than before: floored at 0


def test_lisi_of_batch_balanced_distance_shells_is_known():
    # Each cell's 90 other neighbours come in shells at one distance per shell (1, 2, ...), each
    # shell holding the same batch mix: whatever precision the perplexity search settles on, the
    # batch weights equal that mix. Shells of b1+b2 -> inverse Simpson 2, scaled iLISI 1; shells
    # of b1+b1+b2 among three batches -> 1 / (4/9 + 1/9) = 1.8, scaled (1.8 - 1) / 2 = 0.4.
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    batches = np.repeat(["b1", "b2", "b3"], 100)
    pools = {b: np.flatnonzero(batches == b) for b in ("b1", "b2", "b3")}

    def shells(mix):
        idx, dist = [], []
        for i in range(len(batches)):
            others = {b: iter(pools[b][pools[b] != i]) for b in pools}
            row = [i] + [next(others[b]) for _ in range(90 // len(mix)) for b in mix]
            idx.append(row)
            dist.append([0.0] + [float(d) for d in range(1, 90 // len(mix) + 1) for _ in mix])
        return NeighborsResults(indices=np.array(idx), distances=np.array(dist, dtype=np.float32))

    assert scib_metrics.ilisi_knn(shells(("b1", "b2")), batches) == pytest.approx(
        0.5, abs=1e-4
    )  # 3 batches: (2 - 1) / 2
    two = batches != "b3"
    assert scib_metrics.lisi_knn(shells(("b1", "b2")), batches)[two] == pytest.approx(2.0, abs=1e-4)
    assert scib_metrics.ilisi_knn(shells(("b1", "b1", "b2")), batches) == pytest.approx(0.4, abs=1e-4)


def test_embedding_metrics_skip_batch_without_batches():
    X, labels = gaussian_blobs(n_per=20)
    out = emb.embedding_metrics(X, labels, batches=None, k=5, resolutions=(0.5,))
    assert not {
        "ilisi",
        "asw_batch",
        "kbet_acceptance",
        "graph_connectivity",
        "pcr_comparison",
        "isolated_labels",
    } & set(out)
    assert {"nmi", "ari", "asw_label", "clisi"} <= set(out)


def _reference_lisi(X, categories, n_neighbors=90, perplexity=30.0):
    """Harmony's LISI written out (Korsunsky et al. 2019): per cell, Gaussian weights of the
    Euclidean distances to its n_neighbors - 1 nearest other cells, precision bisected to the
    perplexity, then 1 / sum over categories of the squared weight sums."""
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=n_neighbors).fit(X).kneighbors(X)
    dist, idx = dist[:, 1:], idx[:, 1:]
    _, codes = np.unique(categories, return_inverse=True)
    lisi = []
    for d, c in zip(dist, codes[idx]):
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(100):
            p = np.exp(-d * beta)
            p /= p.sum()
            entropy = -np.sum(p * np.log(np.clip(p, 1e-300, None)))
            if abs(entropy - np.log(perplexity)) < 1e-8:
                break
            lo, hi = (beta, hi) if entropy > np.log(perplexity) else (lo, beta)
            beta = beta * 2 if np.isinf(hi) else (lo + hi) / 2
        lisi.append(1.0 / np.sum(np.bincount(c, weights=p, minlength=codes.max() + 1) ** 2))
    return np.asarray(lisi)


def test_scib_metrics_agree_with_reference_computations():
    """The numbers scib-metrics gives equal the definitions written out independently: label ASW =
    (scikit-learn silhouette + 1) / 2; batch ASW = per label, mean of 1 - |silhouette by batch|,
    then the mean over labels; LISI = Harmony's. cellfoundry's earlier iLISI weighted squared
    distances and left self out of 90 neighbours (not 89 others): about 0.02 higher here."""
    from sklearn.metrics import silhouette_samples, silhouette_score

    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 6)).astype(np.float32)
    X[:50] += 3
    labels, batches = np.repeat(["a", "b", "c"], 50), rng.choice(["b1", "b2", "b3"], 150)
    out = emb.embedding_metrics(X, labels, batches)
    assert out["asw_label"] == pytest.approx((silhouette_score(X, labels) + 1) / 2, abs=1e-5)
    per_label = [np.mean(1 - np.abs(silhouette_samples(X[labels == g], batches[labels == g]))) for g in "abc"]
    assert out["asw_batch"] == pytest.approx(np.mean(per_label), abs=1e-5)
    assert out["ilisi"] == pytest.approx((np.median(_reference_lisi(X, batches)) - 1) / 2, abs=1e-4)
    assert out["clisi"] == pytest.approx((3 - np.median(_reference_lisi(X, labels))) / 2, abs=1e-4)


def test_scores_and_aggregates_equal_scib_metrics_benchmarker():
    """Benchmarker run on the same cells and neighbours (its scIB-paper metric set: Leiden, not
    k-means; its BRAS left out, as here) gives the same values; the aggregates follow its
    get_results, the batch silhouette being the one metric it lacks."""
    import anndata as ad
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    rng = np.random.default_rng(1)
    X = rng.normal(size=(150, 6)).astype(np.float32)
    X[:50] += 3
    labels, batches = np.repeat(["a", "b", "c"], 50), rng.choice(["b1", "b2"], 150)
    X_pre = X + 2 * rng.normal(size=X.shape).astype(np.float32)
    adata = ad.AnnData(
        np.zeros((150, 1), np.float32), obs=pd.DataFrame({"ct": labels, "batch": batches}, index=map(str, range(150)))
    )
    adata.obsm["emb"], adata.obsm["pre"] = X, X_pre
    bench = Benchmarker(
        adata,
        "batch",
        "ct",
        ["emb"],
        BioConservation(nmi_ari_cluster_labels_leiden=True, nmi_ari_cluster_labels_kmeans=False),
        BatchCorrection(bras=False),
        pre_integrated_embedding_obsm_key="pre",
        progress_bar=False,
    )
    bench.prepare(neighbor_computer=emb.neighbors)
    with emb._exact_diffusion_neighbors():
        bench.benchmark()
    want = bench.get_results(min_max_scale=False).loc["emb"]
    # seed 42 and scib-metrics' resolution grid: its own optimize_resolution
    ours = emb.embedding_metrics(X, labels, batches, X_pre=X_pre, seed=42)
    names = {
        "isolated_labels": "Isolated labels",
        "nmi": "Leiden NMI",
        "ari": "Leiden ARI",
        "asw_label": "Silhouette label",
        "clisi": "cLISI",
        "ilisi": "iLISI",
        "kbet_acceptance": "KBET",
        "graph_connectivity": "Graph connectivity",
        "pcr_comparison": "PCR comparison",
    }
    for ours_name, theirs in names.items():
        assert ours[ours_name] == pytest.approx(float(want[theirs]), abs=1e-6), ours_name
    agg = emb.aggregates(ours)
    assert agg["bio_conservation"] == pytest.approx(float(want["Bio conservation"]), abs=1e-6)
    assert agg["batch_correction"] == pytest.approx(
        (4 * float(want["Batch correction"]) + ours["asw_batch"]) / 5, abs=1e-6
    )
    assert agg["scib_total"] == pytest.approx(0.6 * agg["bio_conservation"] + 0.4 * agg["batch_correction"])
    # kBET with its diffusion-map neighbours from pynndescent (unpatched) is checked in
    # benchmarks/bench_eval_metrics.py: its numba compilation alone takes over a minute.


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
    assert sp.issparse(out) and out.shape == counts.shape
    out = out.toarray()
    assert set(np.unique(out)) <= set(np.unique(counts))
    assert abs(out[:, 0].mean() - counts[:, 0].mean()) < 0.5
    assert abs(np.corrcoef(out[:, 0], out[:, 1])[0, 1]) < 0.15


def test_independent_genes_draws_from_a_capped_pool_of_the_group():
    """At scale each group's pool is a subsample of max_pool cells, still of that group: a cell
    of group a gets only a's values; without the cap the draws are those of the whole pool."""
    counts = sp.csr_matrix(np.vstack([np.full((300, 3), 1.0), np.full((300, 3), 7.0)]).astype(np.float32))
    groups = np.array(["a"] * 300 + ["b"] * 300)
    wanted = np.array(["b", "a"] * 50)
    capped = gen.independent_genes_sample(counts, groups, wanted, seed=1, max_pool=10).toarray()
    np.testing.assert_array_equal(capped[wanted == "a"], 1.0)
    np.testing.assert_array_equal(capped[wanted == "b"], 7.0)
    whole = gen.independent_genes_sample(counts, groups, wanted, seed=1, max_pool=1000)
    np.testing.assert_array_equal(whole.toarray(), capped)  # constant groups: the cap changes nothing here


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
    rows, embedding = gen.compare_sets(
        train,
        train_obs,
        test,
        test_obs,
        generated,
        gen_obs,
        ["cell_type"],
        "cell_type",
        n_hvg=40,
        n_pcs=10,
        min_cells_per_group=10,
        seed=0,
    )
    table = pd.DataFrame(rows)
    assert set(table["method"]) == {gen.MODEL, gen.REFERENCE_REAL, gen.REFERENCE_WEAK}
    assert {"all", "T", "B", "mean over conditions"} <= set(table["condition"])

    def get(m, k, c="all"):
        return table.query("method == @m and metric == @k and condition == @c")["value"].item()

    # The model here samples the true distribution: close to the floor, and labels recovered.
    assert get(gen.MODEL, "label_accuracy") > 0.9
    assert get(gen.REFERENCE_REAL, "label_accuracy") > 0.9
    assert (
        get(gen.MODEL, "mmd_rbf", "mean over conditions")
        < get(gen.REFERENCE_WEAK, "mmd_rbf", "mean over conditions") * 5
    )
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


def test_per_gene_pearson_and_log1p_normalise():
    from cellfoundry.evaluate import reconstruction as rec
    from cellfoundry.utils import log1p_normalise

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(50, 4))
    pred = obs.copy()
    pred[:, 1] *= -1  # anti-correlated gene
    pred[:, 3] = 1.0  # constant prediction: undefined
    r = rec.per_gene_pearson(pred, obs)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[3])
    counts = np.array([[1.0, 3.0], [0.0, 0.0]])
    expected = np.log1p(np.array([[0.25, 0.75], [0.0, 0.0]]) * 1e4)
    assert np.allclose(log1p_normalise(counts), expected)


def test_summary_marks_model_losses(tmp_path):
    from cellfoundry.evaluate import summary

    pd.DataFrame(
        [
            dict(method=m, metric="knn_accuracy", value=v)
            for m, v in (("se", 0.6), ("xpressor", 0.9), ("pca_hvg", 0.8), ("random_se", 0.3))
        ]
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
    rows, summary = emb.compare_embeddings(
        {"se": X, "pca": X[:, :4]}, None, batches, model_methods=("se",), pre_integration="pca", k=5
    )
    assert {"knn_accuracy", "asw_label", "nmi", "clisi", "isolated_labels", "bio_conservation", "scib_total"} <= set(
        summary["skipped"]
    )
    assert "cell_type is null" in summary["skipped"]["nmi"]
    assert summary["n_unlabelled"] == len(X) and summary["n_labelled"] == 0
    table = pd.DataFrame(rows)
    assert table.query("metric == 'nmi'")["value"].isna().all() and len(table.query("metric == 'nmi'")) == 2
    # batch metrics need no labels: the label-stratified ones take all cells as one group
    assert (
        set(emb.BATCH_METRICS) <= set(summary["scores"]["se"])
        and np.isfinite(list(summary["scores"]["se"].values())).all()
    )
    assert summary["aggregated"] == {"bio_conservation": [], "batch_correction": list(emb.BATCH_METRICS)}
    assert set(table.query("metric == 'ilisi'")["source"]) == {"scib-metrics"} and set(
        table.query("metric == 'knn_accuracy'")["source"]
    ) == {"cellfoundry"}
    # without a pre-integration embedding the PCR comparison is skipped, with its reason
    _, summary = emb.compare_embeddings({"se": X}, None, batches, k=5)
    assert "pre-integration" in summary["skipped"]["pcr_comparison"] and "pcr_comparison" not in summary["scores"]["se"]
    # all labels NaN: the same skip, with the reason counting the cells
    _, summary = emb.compare_embeddings({"se": X}, np.full(len(X), np.nan, dtype=object), None, k=5)
    assert "0 labelled cells" in summary["skipped"]["knn_accuracy"] and "ilisi" in summary["skipped"]


def test_labels_without_batches_skip_batch_metrics_and_the_total():
    X, labels = gaussian_blobs(n_per=20)
    rows, summary = emb.compare_embeddings({"se": X}, labels, None, k=5, resolutions=(0.5,))
    for metric in (*emb.BATCH_METRICS, "isolated_labels", "batch_correction", "scib_total"):
        assert "batch is null" in summary["skipped"][metric], metric
    scores = summary["scores"]["se"]
    assert summary["aggregated"]["bio_conservation"] == ["nmi", "ari", "asw_label", "clisi"]
    assert scores["bio_conservation"] == pytest.approx(
        np.mean([scores[m] for m in ("nmi", "ari", "asw_label", "clisi")])
    )
    assert pd.DataFrame(rows).query("metric == 'scib_total'")["value"].isna().all()


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
    rows, embedding = gen.compare_sets(
        train,
        train_obs,
        test,
        test_obs,
        generated,
        gen_obs,
        ["cell_type"],
        "cell_type",
        n_hvg=30,
        n_pcs=5,
        min_cells_per_group=5,
        seed=0,
    )
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
