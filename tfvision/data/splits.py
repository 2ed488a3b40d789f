"""Seeded, reproducible train/val/test splits.

Rows whose split the layout already fixes (a split column, a val CSV, val/
folders) keep it. The rest are split by one of

- ``random``      plain shuffle;
- ``stratified``  keeps class proportions;
- ``grouped``     stratified on classes while no group (patient, lesion) is in two splits.

With ``split.fold`` set, the held-out part is that fold of a K-fold of the same kind.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import (
    KFold,
    StratifiedGroupKFold,
    StratifiedKFold,
)

from tfvision.config import SplitConfig
from tfvision.errors import DataError


def _folds(method: str, n_folds: int, seed: int):
    if method == "grouped":
        return StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    if method == "stratified":
        return StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return KFold(n_splits=n_folds, shuffle=True, random_state=seed)


def holdout_mask(
    labels: np.ndarray, groups: np.ndarray, method: str, *, fraction: float | None = None,
    n_folds: int | None = None, fold: int = 0, seed: int = 0,
) -> np.ndarray:
    """Boolean mask of held-out rows.

    Either `fraction` (a holdout of about that size, realised as one fold of
    round(1/fraction) folds so grouping and stratification hold) or
    `n_folds` + `fold`.
    """
    if n_folds is None:
        n_folds = max(2, int(round(1.0 / fraction)))
    n = len(labels)
    unit = len(np.unique(groups)) if method == "grouped" else n
    if unit < n_folds:
        raise DataError(f"cannot make {n_folds} folds from {unit} {'groups' if method == 'grouped' else 'samples'}")
    strat = labels
    if method == "stratified":
        # Classes too small to appear in every fold would make sklearn refuse;
        # they are stratified as one pooled "rare" class instead.
        values, counts = np.unique(labels, return_counts=True)
        rare = set(values[counts < n_folds])
        strat = np.array(["\0rare" if v in rare else v for v in labels])
        if len(np.unique(strat)) == 1:
            method = "random"
    splitter = _folds(method, n_folds, seed)
    x = np.zeros(n)
    splits = list(splitter.split(x, strat, groups) if method == "grouped" else splitter.split(x, strat))
    mask = np.zeros(n, dtype=bool)
    mask[splits[fold][1]] = True
    return mask


def assign_splits(frame: pd.DataFrame, split: SplitConfig, seed: int) -> pd.DataFrame:
    """Fill the empty ``split`` cells. Returns a new frame."""
    frame = frame.copy()
    free = (frame["split"] == "").to_numpy()
    if split.test_fraction > 0 and free.any():
        sub = frame[free]
        held = holdout_mask(sub["label"].to_numpy(), sub["group"].to_numpy(), split.method,
                            fraction=split.test_fraction, seed=seed + 1)
        frame.loc[sub.index[held], "split"] = "test"
        free = (frame["split"] == "").to_numpy()
    has_val = (frame["split"] == "val").any()
    if free.any() and not has_val:
        sub = frame[free]
        if split.fold is not None:
            held = holdout_mask(sub["label"].to_numpy(), sub["group"].to_numpy(), split.method,
                                n_folds=split.n_folds, fold=split.fold, seed=seed)
        else:
            frac = split.val_fraction / (1.0 - split.test_fraction)
            held = holdout_mask(sub["label"].to_numpy(), sub["group"].to_numpy(), split.method,
                                fraction=frac, seed=seed)
        frame.loc[sub.index[held], "split"] = "val"
    frame.loc[frame["split"] == "", "split"] = "train"
    for name in ("train", "val"):
        if not (frame["split"] == name).any():
            raise DataError(f"the {name} split is empty; check data.split or the split column")
    return frame


def leaked_groups(frame: pd.DataFrame) -> set[str]:
    """Groups that appear in more than one split (should be empty for grouped splits)."""
    per_group = frame.groupby("group")["split"].nunique()
    return set(per_group[per_group > 1].index)
