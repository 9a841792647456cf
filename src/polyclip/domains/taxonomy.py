"""Tree-of-life classification as BioCLIP does it (Stevens et al. 2024, "BioCLIP: A Vision
Foundation Model for the Tree of Life"; reference Imageomics/pybioclip ``predict.py``).

A taxon is its seven Linnaean ranks plus an optional common name. BioCLIP trains with several text
types per image (taxonomic, scientific, common, and mixes); prediction scores every species, and a
higher rank's score is the sum of the probabilities of the species under it that exceed ``min_prob``
(pybioclip's ``format_grouped_probs``, default 1e-9). Predictions can be restricted to a subtree
(``within={"family": "Corvidae"}``): the softmax then runs over that subtree's species only, as
pybioclip's taxon filter does.

Two sources of species weights, as pybioclip has them:
- ``TreeOfLife.load``: the text embeddings pybioclip downloads (``embeddings/txt_emb_species.npy``,
  float (E, S): one *column* per species, and ``txt_emb_species.json``, a list of
  ``[[kingdom, phylum, class, order, family, genus, species epithet], common name]`` in column order);
- a taxa CSV, whose captions are encoded here (``text_type``).
Free-form labels go through ``custom_labels_classifier``: pybioclip's ``CustomLabelsClassifier``, each
label stripped and scored with the mean of OpenAI's 80 ImageNet templates.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyclip.zero_shot import ZeroShotClassifier, class_embeddings

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
MIN_PROB = 1e-9  # pybioclip's default: species at or below it do not count in a higher rank's sum
TEXT_TYPES = ("taxonomic", "scientific", "common", "scientific_common", "taxonomic_common")


class TaxonomyError(ValueError):
    pass


@dataclass(frozen=True)
class Taxon:
    kingdom: str
    phylum: str
    class_: str
    order: str
    family: str
    genus: str
    species: str  # the specific epithet ("corax"), as BioCLIP's TreeOfLife records it
    common_name: str = ""

    def rank(self, name: str) -> str:
        if name not in RANKS:
            raise TaxonomyError(f"unknown rank {name!r}; ranks are {', '.join(RANKS)}")
        return getattr(self, "class_" if name == "class" else name)

    @property
    def scientific_name(self) -> str:
        return f"{self.genus} {self.species}".strip()

    def path(self, up_to: str = "species") -> tuple[str, ...]:
        """The names of every rank from kingdom down to ``up_to``."""
        return tuple(self.rank(r) for r in RANKS[: RANKS.index(up_to) + 1])

    def text(self, text_type: str = "taxonomic_common") -> str:
        """The caption BioCLIP trains and predicts with, for one text type."""
        taxonomic = " ".join(self.path())
        if text_type == "taxonomic":
            return f"a photo of {taxonomic}."
        if text_type == "scientific":
            return f"a photo of {self.scientific_name}."
        if text_type == "common":
            return f"a photo of {self.common_name or self.scientific_name}."
        if text_type == "scientific_common":
            suffix = f" with common name {self.common_name}" if self.common_name else ""
            return f"a photo of {self.scientific_name}{suffix}."
        if text_type == "taxonomic_common":
            suffix = f" with common name {self.common_name}" if self.common_name else ""
            return f"a photo of {taxonomic}{suffix}."
        raise TaxonomyError(f"unknown text type {text_type!r}; choose one of {', '.join(TEXT_TYPES)}")


def read_taxa(path: str | Path) -> list[Taxon]:
    """A CSV with columns kingdom, phylum, class, order, family, genus, species[, common_name]."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [r for r in RANKS if r not in (reader.fieldnames or [])]
            if missing:
                raise TaxonomyError(f"{path}: missing columns {missing}")
            taxa = [
                Taxon(*(row[r].strip() for r in RANKS), common_name=(row.get("common_name") or "").strip())
                for row in reader
            ]
    except OSError as error:
        raise TaxonomyError(f"cannot read {path}: {error}") from error
    if not taxa:
        raise TaxonomyError(f"{path} lists no taxa")
    return taxa


@dataclass
class TreeOfLife:
    """Species text embeddings as pybioclip distributes them (TreeOfLife-10M / -200M datasets)."""

    embeddings: torch.Tensor  # (S, E) float32, one row per species (the file stores the transpose)
    taxa: list[Taxon]

    @classmethod
    def load(cls, embeddings_path: str | Path, names_path: str | Path | None = None) -> TreeOfLife:
        """``txt_emb_species.npy`` and ``txt_emb_species.json`` (default: beside the .npy)."""
        embeddings_path = Path(embeddings_path)
        names_path = Path(names_path) if names_path is not None else embeddings_path.with_suffix(".json")
        try:
            array = np.load(embeddings_path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise TaxonomyError(f"cannot read {embeddings_path} as a .npy array: {error}") from None
        try:
            names = json.loads(names_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TaxonomyError(f"cannot read species names {names_path}: {error}") from None
        taxa = [_tree_of_life_taxon(entry, names_path, index) for index, entry in enumerate(names or [])]
        if not taxa:
            raise TaxonomyError(f"{names_path} lists no species")
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise TaxonomyError(
                f"{embeddings_path}: expected a 2-D float array, got {array.dtype} {array.shape}"
            )
        if array.shape[1] != len(taxa):
            raise TaxonomyError(
                f"{embeddings_path} has shape {array.shape}; pybioclip's file is (embedding dim, species) "
                f"with one column per entry of {names_path} ({len(taxa)})"
            )
        return cls(torch.from_numpy(np.ascontiguousarray(array.T)).float(), taxa)


def _tree_of_life_taxon(entry, origin: Path, index: int) -> Taxon:
    """``[[kingdom, ..., genus, epithet], common name]`` -> Taxon (pybioclip's json entry)."""
    if (
        not isinstance(entry, list)
        or len(entry) != 2
        or not isinstance(entry[0], list)
        or len(entry[0]) != len(RANKS)
        or not all(isinstance(name, str) for name in [*entry[0], entry[1]])
    ):
        raise TaxonomyError(
            f"{origin}, entry {index}: expected [[kingdom, phylum, class, order, family, genus, epithet], "
            f"common name], got {entry!r}"
        )
    return Taxon(*entry[0], common_name=entry[1])


def custom_labels_classifier(model, tokenizer, preprocess, labels: Sequence[str], batch_size: int = 256):
    """pybioclip's ``CustomLabelsClassifier``: stripped labels, OpenAI's 80 ImageNet templates averaged."""
    labels = [label.strip() for label in labels]
    if not labels or not all(labels):
        raise TaxonomyError("custom labels must be non-empty strings")
    return ZeroShotClassifier(model, tokenizer, labels, "openai_imagenet", preprocess, batch_size)


class TaxonomicClassifier:
    """Scores images against species captions; ranks above species are sums over their species."""

    def __init__(
        self,
        model,
        tokenizer,
        preprocess,
        taxa: Sequence[Taxon],
        text_type: str = "taxonomic_common",
        batch_size: int = 256,
        weights: torch.Tensor | None = None,
    ):
        """``weights`` (S, E): the species' text embeddings as given (TreeOfLife) instead of encoding captions."""
        if not taxa:
            raise TaxonomyError("a taxonomic classifier needs at least one taxon")
        self.model, self.preprocess, self.taxa = model, preprocess, list(taxa)
        if weights is not None:
            if weights.ndim != 2 or weights.shape[0] != len(self.taxa):
                raise TaxonomyError(f"weights must be ({len(self.taxa)}, E), got {tuple(weights.shape)}")
            self.weights = weights.float()
            return
        captions = [taxon.text(text_type) for taxon in self.taxa]
        # the captions are complete sentences: the template is the identity
        self.weights = class_embeddings(model, tokenizer, captions, ["{}"], batch_size)  # (S, E)

    @classmethod
    def from_tree_of_life(cls, model, preprocess, tree: TreeOfLife) -> TaxonomicClassifier:
        """Predict over pybioclip's TreeOfLife species embeddings (no text is encoded)."""
        return cls(model, None, preprocess, tree.taxa, weights=tree.embeddings)

    def _mask(self, within: dict[str, str] | None) -> torch.Tensor:
        keep = torch.ones(len(self.taxa), dtype=torch.bool)
        for rank, name in (within or {}).items():
            keep &= torch.tensor([taxon.rank(rank) == name for taxon in self.taxa])
        if not keep.any():
            raise TaxonomyError(f"no taxon matches {within}")
        return keep

    @torch.inference_mode()
    def species_probabilities(self, images, within: dict[str, str] | None = None) -> torch.Tensor:
        """(B, S) probabilities over the species (zero outside ``within``)."""
        pixels = (
            images if isinstance(images, torch.Tensor) else torch.stack([self.preprocess(i) for i in images])
        )
        features = self.model.encode_image(pixels, normalize=True).float().cpu()
        return self.probabilities_from_features(features, within)

    def probabilities_from_features(self, features: torch.Tensor, within: dict[str, str] | None = None):
        """(B, S) from L2-normalised image embeddings (B, E): softmax of exp(logit_scale) * cosine."""
        scale = (
            self.model.logit_scale.detach().float().cpu().clamp(max=self.model.config.logit_scale_max).exp()
        )
        logits = (scale * features.float() @ self.weights.T).masked_fill(~self._mask(within), -torch.inf)
        return logits.softmax(dim=-1)

    def predict(
        self,
        images,
        rank: str = "species",
        k: int = 5,
        within: dict[str, str] | None = None,
        min_prob: float = MIN_PROB,
    ):
        """Per image, the top-k (taxon path at ``rank``, probability) pairs, as pybioclip's ``predict``."""
        return self.rank(self.species_probabilities(images, within), rank, k, min_prob)

    def rank(
        self, probabilities: torch.Tensor, rank: str = "species", k: int = 5, min_prob: float = MIN_PROB
    ):
        """Top-k per row of (B, S) species probabilities. At species rank every species competes; above
        it a taxon's score sums its species with probability > ``min_prob`` (pybioclip), taxa without
        one are left out, and ties keep the order in which their first species appear."""
        if rank not in RANKS:
            raise TaxonomyError(f"unknown rank {rank!r}; ranks are {', '.join(RANKS)}")
        if k < 1:
            raise TaxonomyError(f"k must be positive, got {k}")
        if rank == "species":
            values, index = probabilities.topk(min(k, probabilities.shape[1]), dim=-1)
            return [
                [(self.taxa[i].path(), float(v)) for v, i in zip(row_v.tolist(), row_i.tolist()) if v > 0]
                for row_v, row_i in zip(values, index)
            ]
        groups: dict[tuple[str, ...], int] = {}
        group_of_species = torch.tensor([groups.setdefault(t.path(rank), len(groups)) for t in self.taxa])
        names = list(groups)
        out = []
        for row in probabilities:
            passing = row > min_prob  # (S,)
            summed = torch.zeros(len(names)).index_add_(0, group_of_species, torch.where(passing, row, 0.0))
            first = torch.full((len(names),), len(self.taxa), dtype=torch.long)
            first.scatter_reduce_(0, group_of_species[passing], passing.nonzero().squeeze(1), "amin")
            present = [g for g in range(len(names)) if first[g] < len(self.taxa)]
            present.sort(key=lambda g: (-float(summed[g]), int(first[g])))
            out.append([(names[g], float(summed[g])) for g in present[:k]])
        return out
