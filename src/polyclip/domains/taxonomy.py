"""Tree-of-life classification as BioCLIP does it (Stevens et al. 2024, "BioCLIP: A Vision
Foundation Model for the Tree of Life"; reference Imageomics/pybioclip ``predict.py``).

A taxon is its seven Linnaean ranks plus an optional common name. BioCLIP trains with several text
types per image (taxonomic, scientific, common, and mixes); prediction scores every species, and a
higher rank's score is the sum of the probabilities of the species under it. Predictions can be
restricted to a subtree (``within={"family": "Corvidae"}``): the softmax then runs over that subtree's
species only, as pybioclip's taxon filter does.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from polyclip.zero_shot import class_embeddings

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
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
    ):
        if not taxa:
            raise TaxonomyError("a taxonomic classifier needs at least one taxon")
        self.model, self.preprocess, self.taxa = model, preprocess, list(taxa)
        captions = [taxon.text(text_type) for taxon in self.taxa]
        # the captions are complete sentences: the template is the identity
        self.weights = class_embeddings(model, tokenizer, captions, ["{}"], batch_size)  # (S, E)

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
        scale = (
            self.model.logit_scale.detach().float().cpu().clamp(max=self.model.config.logit_scale_max).exp()
        )
        logits = (scale * features @ self.weights.T).masked_fill(~self._mask(within), -torch.inf)
        return logits.softmax(dim=-1)

    def predict(self, images, rank: str = "species", k: int = 5, within: dict[str, str] | None = None):
        """Per image, the top-k (taxon path at ``rank``, probability) pairs."""
        if rank not in RANKS:
            raise TaxonomyError(f"unknown rank {rank!r}; ranks are {', '.join(RANKS)}")
        probabilities = self.species_probabilities(images, within)  # (B, S)
        groups: dict[tuple[str, ...], int] = {}
        group_of_species = torch.tensor([groups.setdefault(t.path(rank), len(groups)) for t in self.taxa])
        summed = torch.zeros(probabilities.shape[0], len(groups)).index_add_(
            1, group_of_species, probabilities
        )
        names = list(groups)
        values, index = summed.topk(min(k, len(names)), dim=-1)
        return [
            [(names[i], float(v)) for v, i in zip(row_v, row_i) if v > 0]
            for row_v, row_i in zip(values, index)
        ]
