"""Which part of the autoencoder holds generation back: decoders of the real test cells scored in
the evaluation's own space (seurat_v3 HVGs of the train cells, 30 PCs of the real test cells,
5-NN real-vs-generated AUC; 0.5 = indistinguishable), on a finished latent-space run.

Rows, each a set of counts for the real test cells (each cell's library size):
- the ceiling of evaluate_generation: the cells' own Xpressor latents decoded as samples are;
- the same decoded means with Poisson counts, and with a per-(gene, condition group) NB theta
  fitted by moments on the training cells: is it the noise model?
- the cell's condition group's mean profile, NB as above: a decoder that knows only the condition;
- the mean profile of the cell's 10 nearest real training cells in those PCs, NB as above: a
  decoder whose per-cell means are about right;
- the independent-genes generator and the real training cells (the floor), as in the report.

Beside each: the accuracy with which a 15-NN classifier of the condition groups, fitted on the
real training cells' PCs, places the cells in their own group (and in their cell type, the first
condition column), and their spread in the PCs (mean distance to the centre).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generation_ceilings.py --run RUN_DIR --dataset NAME

RUN_DIR is a finished workflow run (e.g. benchmarks/real_data.py's WORKDIR/kang/seed0): the
condition groups are those its evaluate_generation used. The training cells' counts are held dense: a data set of a
few thousand cells (PBMC3k, Kang), not a million.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import yaml
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from cellfoundry.evaluate import generation as gen
from cellfoundry.models.se_checkpoint import GENE_EMBEDDINGS_NAME
from cellfoundry.xpressor.decode import sampled_counts, xpressor_decoder

NEIGHBOURS = 10


def moment_theta(mu: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """NB inverse dispersion per gene from Var = mu + mu^2 / theta, pooled over cells."""
    excess = ((counts - mu) ** 2 - mu).sum(0)
    return np.clip((mu**2).sum(0) / np.maximum(excess, 1e-8), 1e-2, 1e6)


class GroupNB:
    """Counts drawn from NB(mu, theta of the cell's group and gene); theta fitted by moments on
    the training cells' means and counts (the whole training set's for an unseen group)."""

    def __init__(self, mu_train: np.ndarray, counts_train: np.ndarray, groups_train: np.ndarray):
        self.fallback = moment_theta(mu_train, counts_train)
        self.theta = {
            g: moment_theta(mu_train[groups_train == g], counts_train[groups_train == g]) for g in set(groups_train)
        }

    def sample(self, mu: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        theta = np.stack([self.theta.get(g, self.fallback) for g in groups])
        return rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished workflow run directory")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    res = args.run / "results"
    real = ad.read_h5ad(res / args.dataset / "qc/filtered.h5ad")
    counts = sp.csr_matrix(real.X, dtype=np.float32)
    library = np.asarray(counts.sum(1)).ravel()
    split = real.obs["split"].astype(str).to_numpy()
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    evaluated = json.loads((res / args.dataset / "eval/generation.json").read_text())
    groups = gen.groups_of(real.obs, evaluated["condition_columns"])
    g_train, g_test = groups[train], groups[test]
    train_counts, test_counts = counts[train], counts[test]
    x_train = train_counts.toarray()

    def rng(row: int) -> np.random.Generator:
        # one stream per row, so a row's draws do not depend on the rows drawn before it
        return np.random.default_rng([args.seed, row])

    space = gen.fit_cfgen_space(train_counts, test_counts, seed=args.seed)
    pc_train, pc_test = space.project(train_counts), space.project(test_counts)

    latents = np.load(res / args.dataset / "xpressor/latents.npy", mmap_mode="r")
    folder = yaml.safe_load((args.run / "config.yaml").read_text()).get("se", {}).get("model_folder")
    vocab = Path(folder) / GENE_EMBEDDINGS_NAME if folder else res / "shared/vocab/gene_embeddings.pt"
    decode = xpressor_decoder(res / args.dataset / "xpressor/model.ckpt", vocab, list(real.var_names))

    mu_xp_train = np.concatenate([b.mean for b in decode(latents[train], library[train], args.seed, with_counts=False)])
    # the test cells once: their means, and their counts sampled as evaluate_generation's ceiling
    decoded_test = list(decode(latents[test], library[test], args.seed))
    mu_xp_test = np.concatenate([b.mean for b in decoded_test])
    fraction = x_train / np.maximum(x_train.sum(1, keepdims=True), 1.0)
    group_profile = {g: fraction[g_train == g].mean(0) for g in set(g_train)}
    overall = fraction.mean(0)
    mu_group_train = np.stack([group_profile[g] for g in g_train]) * library[train, None]
    mu_group_test = np.stack([group_profile.get(g, overall) for g in g_test]) * library[test, None]
    neighbours = NearestNeighbors(n_neighbors=NEIGHBOURS + 1).fit(pc_train)
    # a training cell's own row is its nearest neighbour: leave it out
    near_train = neighbours.kneighbors(pc_train, return_distance=False)[:, 1:]
    near_test = neighbours.kneighbors(pc_test, n_neighbors=NEIGHBOURS, return_distance=False)
    mu_near_train = fraction[near_train].mean(1) * library[train, None]
    mu_near_test = fraction[near_test].mean(1) * library[test, None]

    def group_nb(mu_train: np.ndarray, mu_test: np.ndarray, row: int) -> np.ndarray:
        return GroupNB(mu_train, x_train, g_train).sample(mu_test, g_test, rng(row))

    rows = {
        gen.CEILING: sampled_counts(decoded_test),
        "decoded means, Poisson": rng(1).poisson(mu_xp_test).astype(np.float32),
        "decoded means, NB theta(gene, group)": group_nb(mu_xp_train, mu_xp_test, 2),
        "group mean profile, NB theta(gene, group)": group_nb(mu_group_train, mu_group_test, 3),
        f"{NEIGHBOURS}-NN real profile, NB theta(gene, group)": group_nb(mu_near_train, mu_near_test, 4),
        gen.REFERENCE_WEAK: gen.independent_genes_sample(train_counts, g_train, g_test, seed=args.seed),
        gen.REFERENCE_REAL: train_counts,
    }
    classifier = KNeighborsClassifier(15).fit(pc_train, g_train)
    cell_type = np.vectorize(lambda g: str(g).split(" | ")[0])

    print(
        f"{args.dataset} ({args.run}): {len(train)} train / {len(test)} test cells, "
        f"{len(set(g_test))} condition groups; real test cells: group accuracy "
        f"{np.mean(classifier.predict(pc_test) == g_test):.3f}, spread "
        f"{np.linalg.norm(pc_test - pc_test.mean(0), axis=1).mean():.1f}"
    )
    header = ("kNN-AUC", "r2 mean", "r2 var", "group", "type", "spread")
    print(f"{'decoder of the real test cells':48s} " + " ".join(f"{h:>8s}" for h in header))
    test_lognorm = space.lognorm(test_counts)
    for name, generated in rows.items():
        pc = space.project(generated)
        auc = gen.knn_real_vs_generated_auc(pc_test, pc, seed=args.seed)
        moments = gen.moment_agreement(test_lognorm, space.lognorm(generated))
        if name == gen.REFERENCE_REAL:  # the classifier's own fitting cells would find themselves
            placed = ("-", "-")
        else:
            predicted = classifier.predict(pc)
            placed = tuple(
                f"{np.mean(p == t):.3f}" for p, t in ((predicted, g_test), (cell_type(predicted), cell_type(g_test)))
            )
        print(
            f"{name:48s} {auc:8.3f} {moments['r2_mean']:8.3f} {moments['r2_var']:8.3f} "
            f"{placed[0]:>8s} {placed[1]:>8s} "
            f"{np.linalg.norm(pc - pc.mean(0), axis=1).mean():8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
