"""kNN label accuracy, the one home of both protocols: cross-validated label transfer over all
labelled cells (embedding evaluation, embed_knn) and a classifier fitted on the train split and
scored on the test split (Xpressor's stage summary)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier


def knn_label_transfer(
    X: np.ndarray, labels: Sequence, k: int = 15, n_folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """kNN (k neighbours, Euclidean) label prediction, stratified `n_folds`-fold cross-validation.

    X: [N, D]; labels: [N]. Returns {"knn_accuracy", "knn_macro_f1"} over all out-of-fold
    predictions. Labels with fewer members than `n_folds` still take part (scikit-learn warns).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray([str(v) for v in labels])
    if len(np.unique(y)) < 2:
        raise ValueError("label transfer needs at least two distinct labels")
    n_folds = max(2, min(n_folds, np.bincount(np.unique(y, return_inverse=True)[1]).max()))
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    pred = np.empty_like(y)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for train, test in folds.split(X, y):
            clf = KNeighborsClassifier(n_neighbors=min(k, len(train)))
            clf.fit(X[train], y[train])
            pred[test] = clf.predict(X[test])
    return {
        "knn_accuracy": float(accuracy_score(y, pred)),
        "knn_macro_f1": float(f1_score(y, pred, average="macro")),
    }


def knn_split_accuracy(X: np.ndarray, codes: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 15) -> float:
    """Accuracy on the `test` rows of a k-nearest-neighbour classifier fitted on the `train` rows
    of `X`; `codes` are integer labels, -1 for a missing label (those cells are left out). NaN
    when either side has no labelled cell."""
    train = train[codes[train] >= 0]
    test = test[codes[test] >= 0]
    if len(test) == 0 or len(train) == 0:
        return float("nan")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train))).fit(X[train], codes[train])
    return float((clf.predict(X[test]) == codes[test]).mean())
