"""Association bias probe: WEAT-style effect sizes between group and attribute embeddings.

The Word Embedding Association Test (Semantics derived automatically from language corpora contain
human-like biases, Science 2017), applied to CLIP's joint space as in the image/text embedding
association tests that followed it. Targets X and Y are two groups (prompts such as
"a photo of a <group> person", or images of each group); attributes A and B are two attribute
sets (prompts). With cosine similarity cos:

    s(w, A, B) = mean_a cos(w, a) - mean_b cos(w, b)
    effect     = (mean_x s(x) - mean_y s(y)) / std_{w in X u Y} s(w)      (sample std, ddof = 1)
    S(X, Y)    = sum_x s(x) - sum_y s(y)
    p          = share of equal-size re-partitions (X_i, Y_i) of X u Y with S(X_i, Y_i) >= S(X, Y)

The one-sided p-value enumerates every partition when there are at most ``max_exact`` of them;
otherwise it samples ``num_permutations`` partitions with a seeded generator and reports
(1 + hits) / (1 + num_permutations), the permutation p-value that cannot be zero. An effect
near +2 / -2 means X is strongly more associated with A / B than Y is.

Conventions that differ from Caliskan et al. (2017), who write "std-dev" and
``p = Pr_i[S(X_i, Y_i) > S(X, Y)]``:
- the standard deviation is the sample one (ddof = 1); with the population one (ddof = 0) the effect
  is larger by ``sqrt(n / (n - 1))`` for n = |X| + |Y| target embeddings;
- "at least as extreme" (``>=``, the observed partition included), so p >= 1 / partitions and never 0;
- ``p_value`` is one-sided, in the direction X-with-A: a strong association of X with B (effect near
  -2) reads p near 1, not near 0. ``p_value_two_sided`` counts partitions whose statistic is at least
  as far from the permutation mean (0 when |X| = |Y|) in either direction; use it when either
  direction would be a finding.
"""

from __future__ import annotations

import itertools
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from polyclip.eval.errors import DataError, EvalError

_BATCH = 8192  # partitions scored at once


@dataclass
class AssociationResult:
    effect_size: float  # NaN when every association score is equal
    p_value: float  # one-sided: X more associated with A than Y is
    p_value_two_sided: float  # either direction
    statistic: float  # S(X, Y)
    mean_association_x: float
    mean_association_y: float
    num_partitions: int  # partitions scored for the p-value
    exact: bool  # True when every partition was enumerated

    def summary(self) -> dict[str, float]:
        return {
            "effect_size": self.effect_size,
            "p_value": self.p_value,
            "p_value_two_sided": self.p_value_two_sided,
            "statistic": self.statistic,
        }


def association_scores(
    targets: torch.Tensor, attributes_a: torch.Tensor, attributes_b: torch.Tensor
) -> np.ndarray:
    """(N,) s(w, A, B) for every target embedding w."""
    for name, tensor in (
        ("targets", targets),
        ("attributes A", attributes_a),
        ("attributes B", attributes_b),
    ):
        if tensor.ndim != 2 or tensor.shape[0] == 0:
            raise EvalError(f"{name} must be a non-empty (N, E) tensor, got {tuple(tensor.shape)}")
    targets = F.normalize(targets.double(), dim=-1)
    mean_a = (targets @ F.normalize(attributes_a.double(), dim=-1).T).mean(dim=1)  # (N,)
    mean_b = (targets @ F.normalize(attributes_b.double(), dim=-1).T).mean(dim=1)
    return (mean_a - mean_b).numpy()


def _partition_batches(n: int, size: int, exact: bool, num_permutations: int, seed: int):
    if exact:
        combinations = itertools.combinations(range(n), size)
        while batch := list(itertools.islice(combinations, _BATCH)):
            yield np.array(batch, dtype=np.int64)
        return
    rng = np.random.default_rng(seed)
    remaining = num_permutations
    while remaining > 0:
        count = min(_BATCH, remaining)
        yield np.argsort(rng.random((count, n)), axis=1)[:, :size]  # uniform random subsets of `size`
        remaining -= count


def weat(
    targets_x: torch.Tensor,
    targets_y: torch.Tensor,
    attributes_a: torch.Tensor,
    attributes_b: torch.Tensor,
    num_permutations: int = 10000,
    seed: int = 0,
    max_exact: int = 100_000,
) -> AssociationResult:
    """Effect size and permutation p-values (one- and two-sided) of the differential association of X vs Y
    with A vs B."""
    scores_x = association_scores(targets_x, attributes_a, attributes_b)
    scores_y = association_scores(targets_y, attributes_a, attributes_b)
    scores = np.concatenate([scores_x, scores_y])  # X then Y
    n, size = scores.size, scores_x.size
    if n < 3:
        raise EvalError("an association test needs at least three target embeddings in X and Y together")
    spread = scores.std(ddof=1)
    effect = float((scores_x.mean() - scores_y.mean()) / spread) if spread > 0 else math.nan
    total = scores.sum()
    observed = scores_x.sum() - scores_y.sum()
    center = (2 * size / n - 1) * total  # the statistic's mean over all partitions
    tolerance = 1e-9 * max(1.0, abs(observed))  # the observed partition re-summed in another order
    partitions = math.comb(n, size)
    exact = partitions <= max_exact
    if not exact and num_permutations < 1:
        raise EvalError("num_permutations must be positive when the partitions are too many to enumerate")
    hits = both_hits = scored = 0
    for subsets in _partition_batches(n, size, exact, num_permutations, seed):
        statistics = 2 * scores[subsets].sum(axis=1) - total  # S = sum_I - (total - sum_I)
        hits += int((statistics >= observed - tolerance).sum())
        both_hits += int((np.abs(statistics - center) >= abs(observed - center) - tolerance).sum())
        scored += subsets.shape[0]
    p_value = hits / scored if exact else (1 + hits) / (1 + scored)
    p_two_sided = both_hits / scored if exact else (1 + both_hits) / (1 + scored)
    return AssociationResult(
        effect_size=effect,
        p_value=float(p_value),
        p_value_two_sided=float(p_two_sided),
        statistic=float(observed),
        mean_association_x=float(scores_x.mean()),
        mean_association_y=float(scores_y.mean()),
        num_partitions=scored,
        exact=exact,
    )


@dataclass
class EmbeddingSet:
    """Prompts, or a folder of images, standing for one target group or attribute."""

    label: str
    prompts: list[str] | None = None
    image_folder: Path | None = None


@dataclass
class BiasTest:
    name: str
    targets_x: EmbeddingSet
    targets_y: EmbeddingSet
    attributes_a: EmbeddingSet
    attributes_b: EmbeddingSet


def _embedding_set(value, key: str, test: str, base: Path) -> EmbeddingSet:
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return EmbeddingSet(label=key, prompts=[v.strip() for v in value])
    if isinstance(value, dict):
        label = str(value.get("label", key))
        if "images" in value:
            folder = base / str(value["images"])
            if not folder.is_dir():
                raise DataError(f"bias test {test!r}, {key}: image folder {folder} does not exist")
            return EmbeddingSet(label=label, image_folder=folder)
        if "prompts" in value:
            return _embedding_set(value["prompts"], label, test, base)
    raise DataError(
        f"bias test {test!r}, {key}: expected a non-empty list of prompts, {{'prompts': [...]}} or {{'images': folder}}"
    )


def load_bias_tests(path: str | Path) -> list[BiasTest]:
    """Tests from JSON or TOML: ``{"tests": [{"name", "x", "y", "a", "b"}, ...]}`` (a bare list works in JSON).

    Each of x, y (target groups) and a, b (attributes) is a list of prompts, ``{"label": ..., "prompts": [...]}``
    or ``{"label": ..., "images": "folder"}`` (relative to the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise DataError(f"cannot read bias tests {path}: {error}") from error
    entries = data.get("tests") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty list of tests under 'tests'")
    tests = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: test {number} is not an object")
        name = str(entry.get("name", f"test{number}"))
        missing = [key for key in ("x", "y", "a", "b") if key not in entry]
        if missing:
            raise DataError(
                f"{path}: test {name!r} lacks {', '.join(missing)} (targets x, y; attributes a, b)"
            )
        sets = [_embedding_set(entry[key], key, name, path.parent) for key in ("x", "y", "a", "b")]
        tests.append(BiasTest(name, *sets))
    return tests
