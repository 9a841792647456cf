"""Hierarchical classification: leaf probabilities rolled up to parent ranks, accuracy per rank.

BioCLIP (CVPR 2024; Imageomics/pybioclip ``predict.py``) predicts over species and scores a
higher rank by summing the probabilities of the species under each taxon. StreetCLIP decides
top-down (country first, then region / city inside it). Both are here:

- ``rollup``: at every rank, the group with the largest summed leaf probability;
- ``top_down``: the best group at the top rank, then at each lower rank the best group among the
  children of the group chosen above it.

A hierarchy is a table with one row per leaf class and one column per rank, top rank first
(``kingdom,...,species`` or ``country,region,city``). Groups are identified by their full path,
so two regions of one name in different countries stay apart.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyclip.eval.errors import DataError, EvalError
from polyclip.eval.metrics import to_numpy

MODES = ("rollup", "top_down")


@dataclass(frozen=True)
class Hierarchy:
    ranks: tuple[str, ...]  # top rank first, leaf rank last
    leaf_paths: tuple[tuple[str, ...], ...]  # per leaf class, its name at every rank

    def __post_init__(self) -> None:
        if not self.ranks or not self.leaf_paths:
            raise DataError("a hierarchy needs at least one rank and one leaf")
        for path in self.leaf_paths:
            if len(path) != len(self.ranks) or not all(path):
                raise DataError(f"hierarchy row {path} does not name all {len(self.ranks)} ranks")
        leaves = [path[-1] for path in self.leaf_paths]
        repeated = sorted({leaf for leaf in leaves if leaves.count(leaf) > 1})
        if repeated:
            raise DataError(f"leaf names must be unique; repeated: {', '.join(repeated[:10])}")

    @property
    def leaf_names(self) -> list[str]:
        return [path[-1] for path in self.leaf_paths]

    @classmethod
    def from_csv(cls, path: str | Path) -> Hierarchy:
        """A CSV whose header names the ranks (top first) and whose rows are the leaf classes."""
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = [
                    [cell.strip() for cell in row]
                    for row in csv.reader(handle)
                    if any(c.strip() for c in row)
                ]
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise DataError(f"cannot read hierarchy {path}: {error}") from error
        if len(rows) < 2:
            raise DataError(f"hierarchy {path} needs a header of rank names and at least one leaf row")
        header, body = rows[0], rows[1:]
        for line, row in enumerate(body, start=2):
            if len(row) != len(header):
                raise DataError(f"hierarchy {path}, line {line}: {len(row)} cells for {len(header)} ranks")
        return cls(tuple(header), tuple(tuple(row) for row in body))

    def aligned_to(self, class_names: list[str]) -> Hierarchy:
        """This hierarchy with its leaves in the order of a dataset's class names."""
        by_leaf = {path[-1]: path for path in self.leaf_paths}
        missing = [name for name in class_names if name not in by_leaf]
        if missing:
            raise DataError(f"classes missing from the hierarchy's leaf column: {', '.join(missing[:10])}")
        return Hierarchy(self.ranks, tuple(by_leaf[name] for name in class_names))

    def groups(self, rank: int) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        """(L,) group index of every leaf at ``rank`` and the groups' paths, in first-seen order."""
        keys: dict[tuple[str, ...], int] = {}
        group_of_leaf = np.array([keys.setdefault(path[: rank + 1], len(keys)) for path in self.leaf_paths])
        return group_of_leaf, list(keys)


def roll_up(leaf_probabilities: torch.Tensor, hierarchy: Hierarchy) -> list[torch.Tensor]:
    """Per rank, (N, G_rank) sums of the leaf probabilities under each group."""
    leaf_probabilities = torch.as_tensor(leaf_probabilities).float()
    if leaf_probabilities.ndim != 2 or leaf_probabilities.shape[1] != len(hierarchy.leaf_paths):
        raise EvalError(
            f"leaf probabilities must be (N, {len(hierarchy.leaf_paths)}), got {tuple(leaf_probabilities.shape)}"
        )
    out = []
    for rank in range(len(hierarchy.ranks)):
        group_of_leaf, keys = hierarchy.groups(rank)
        sums = torch.zeros(leaf_probabilities.shape[0], len(keys))
        out.append(sums.index_add_(1, torch.from_numpy(group_of_leaf), leaf_probabilities))
    return out


def predict_ranks(
    leaf_probabilities: torch.Tensor, hierarchy: Hierarchy, mode: str = "rollup"
) -> list[np.ndarray]:
    """Per rank, (N,) predicted group indices (``Hierarchy.groups`` numbering)."""
    if mode not in MODES:
        raise EvalError(f"unknown hierarchy mode {mode!r}; choose one of {', '.join(MODES)}")
    rolled = roll_up(leaf_probabilities, hierarchy)
    predictions = []
    for rank, probabilities in enumerate(rolled):
        if mode == "top_down" and rank > 0:
            _, keys = hierarchy.groups(rank)
            _, parent_keys = hierarchy.groups(rank - 1)
            parent_index = {key: i for i, key in enumerate(parent_keys)}
            parent_of_group = torch.tensor([parent_index[key[:-1]] for key in keys])  # (G,)
            chosen_parent = torch.from_numpy(predictions[-1])  # (N,)
            allowed = parent_of_group[None, :] == chosen_parent[:, None]  # (N, G)
            probabilities = probabilities.masked_fill(~allowed, -torch.inf)
        predictions.append(probabilities.argmax(dim=1).numpy())
    return predictions


def accuracy_per_rank(
    leaf_probabilities: torch.Tensor, true_leaves, hierarchy: Hierarchy, mode: str = "rollup"
) -> dict[str, float]:
    """Rank name -> share of samples whose group at that rank is predicted correctly."""
    true_leaves = to_numpy(true_leaves).astype(np.int64)
    predictions = predict_ranks(leaf_probabilities, hierarchy, mode)
    if true_leaves.shape[0] != predictions[0].shape[0]:
        raise EvalError("leaf probabilities and true labels differ in length")
    out = {}
    for rank, name in enumerate(hierarchy.ranks):
        group_of_leaf, _ = hierarchy.groups(rank)
        out[name] = float((predictions[rank] == group_of_leaf[true_leaves]).mean())
    return out
