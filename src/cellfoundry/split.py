"""The train/test split of the QC'd cells: stratified by cell-type label, and held-out condition
combinations (every cell of one goes to test)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from cellfoundry.utils import UserError, unlabelled


def stratified_split(labels: pd.Series | None, n: int, test_fraction: float, seed: int) -> np.ndarray:
    """'train'/'test' per cell; each label keeps test_fraction of its cells in test (at least one
    cell on each side for labels with two or more cells). Unlabelled cells (NaN, empty) are no
    class: they are split at random, test_fraction of them (rounded) in test."""
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    if labels is None:
        codes = np.zeros(n, dtype=int)
    else:
        codes = pd.factorize(labels.astype(str).to_numpy())[0]
        codes[unlabelled(labels)] = -1
    for code in np.unique(codes):
        members = np.flatnonzero(codes == code)
        if code == -1:
            n_test = int(round(test_fraction * len(members)))
        elif len(members) < 2:
            continue
        else:
            n_test = min(max(int(round(test_fraction * len(members))), 1), len(members) - 1)
        split[rng.permutation(members)[:n_test]] = "test"
    return split


def combination_label(combo: dict) -> str:
    """A held-out combination as one string, e.g. "cell_type=CD4T, condition=stimulated"."""
    return ", ".join(f"{col}={value}" for col, value in combo.items())


def combination_mask(obs: pd.DataFrame, combo: dict) -> np.ndarray:
    """Cells whose obs matches every column=value of `combo` (compared as strings)."""
    mask = np.ones(len(obs), dtype=bool)
    for col, value in combo.items():
        mask &= obs[col].astype(str).to_numpy() == str(value)
    return mask


def control_labels(obs: pd.DataFrame, combo: Mapping, none_values: Mapping[str, str]) -> dict:
    """The labels of the combination's control cells: its stimulus columns (those whose condition
    has a none_value that occurs among the column's labels) at that none_value, the others as in
    the combination. UserError when the combination has no stimulus column."""
    control = {}
    for col, value in combo.items():
        none = none_values.get(col)
        stimulus = none is not None and str(value) != none and (obs[col].astype(str) == none).any()
        control[col] = none if stimulus else str(value)
    if control == {c: str(v) for c, v in combo.items()}:
        raise UserError(
            f"held-out combination {{{combination_label(combo)}}} has no control to predict from: none of its columns "
            "belongs to a multi_component condition whose none_value (e.g. control) labels cells of that column. "
            "Set none_value on the condition holding the stimulus column."
        )
    return control


def holdout_split(
    obs: pd.DataFrame, holdout: list[dict], labels: pd.Series | None, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(split, held_out): every cell of a held-out combination goes to test; the other cells are
    split by stratified_split. Refuses a combination that matches no cell, and one whose parts
    (column=value) are left with no training cell: the model could not learn that part, so the
    composed prediction would be impossible."""
    held = np.zeros(len(obs), dtype=bool)
    for combo in holdout:
        missing = [c for c in combo if c not in obs.columns]
        if missing:
            raise UserError(
                f"split.holdout {{{combination_label(combo)}}} names obs column(s) {missing}; obs columns are "
                f"{list(obs.columns)}. Fix the column names under datasets.<name>.split.holdout."
            )
        mask = combination_mask(obs, combo)
        if not mask.any():
            values = {c: sorted(obs[c].astype(str).unique())[:20] for c in combo}
            raise UserError(
                f"split.holdout {{{combination_label(combo)}}} matches no cell after QC (values: {values}); "
                "fix the labels under datasets.<name>.split.holdout."
            )
        held |= mask
    split = np.full(len(obs), "test", dtype=object)
    rest = np.flatnonzero(~held)
    split[rest] = stratified_split(None if labels is None else labels.iloc[rest], len(rest), test_fraction, seed)
    train = split == "train"
    for combo in holdout:
        for col, value in combo.items():
            if not (train & (obs[col].astype(str).to_numpy() == str(value))).any():
                raise UserError(
                    f"split.holdout {{{combination_label(combo)}}}: its part {col}={value} is in no training cell "
                    "outside the held-out combinations, so the model cannot learn it and the combination cannot "
                    f"be predicted. Hold out a combination whose every part ({col}={value} included) is also seen "
                    "in another combination, or remove it from datasets.<name>.split.holdout."
                )
    return split, held
