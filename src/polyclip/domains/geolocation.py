"""Image geolocation with a CLIP model, as StreetCLIP does it (Haas et al. 2023, "Learning
Generalized Zero-Shot Learners for Open-Domain Image Geolocalization"; model geolocal/StreetCLIP).

Places come from a gazetteer (city, region, country, latitude, longitude). Prediction is
hierarchical zero-shot: the country first from country prompts, then the city among that
country's cities from city prompts (``strategy="flat"`` ranks all cities at once). The predicted
coordinates are the chosen city's. The metric is the share of images whose prediction lies within
25 / 200 / 750 / 2500 km of the truth (great-circle distance), IM2GPS's thresholds.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyclip.zero_shot import class_embeddings

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
THRESHOLDS_KM = (25, 200, 750, 2500)  # IM2GPS city, region, country and continent scales
DEFAULT_TEMPLATES = {
    "country": ["A Street View photo in {}."],
    "city": ["A Street View photo from {}."],
}


class GazetteerError(ValueError):
    pass


@dataclass(frozen=True)
class Place:
    city: str
    region: str
    country: str
    latitude: float
    longitude: float

    @property
    def city_label(self) -> str:
        """How a city is named in its prompt: "Lyon, Auvergne-Rhone-Alpes, France"."""
        return ", ".join(part for part in (self.city, self.region, self.country) if part)


class Gazetteer:
    """The candidate places: one row per city."""

    COLUMNS = ("city", "region", "country", "latitude", "longitude")

    def __init__(self, places: Sequence[Place]):
        if not places:
            raise GazetteerError("a gazetteer needs at least one place")
        self.places = list(places)
        self.countries = sorted({p.country for p in self.places})
        for place in self.places:
            if not (-90 <= place.latitude <= 90 and -180 <= place.longitude <= 180):
                raise GazetteerError(
                    f"{place.city_label}: coordinates ({place.latitude}, {place.longitude}) "
                    "are not a latitude and longitude in degrees"
                )

    @classmethod
    def from_csv(cls, path: str | Path) -> Gazetteer:
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                missing = [c for c in cls.COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise GazetteerError(
                        f"{path}: missing columns {missing}; a gazetteer has {list(cls.COLUMNS)}"
                    )
                places = []
                for line, row in enumerate(reader, start=2):
                    try:
                        places.append(
                            Place(
                                row["city"].strip(),
                                row["region"].strip(),
                                row["country"].strip(),
                                float(row["latitude"]),
                                float(row["longitude"]),
                            )
                        )
                    except (TypeError, ValueError) as error:
                        raise GazetteerError(f"{path}, line {line}: {error}") from error
        except OSError as error:
            raise GazetteerError(f"cannot read gazetteer {path}: {error}") from error
        return cls(places)

    def coordinates(self) -> np.ndarray:
        return np.array([[p.latitude, p.longitude] for p in self.places])  # (P, 2)


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (broadcasting)."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def accuracy_within(predicted: np.ndarray, truth: np.ndarray, thresholds=THRESHOLDS_KM) -> dict[str, float]:
    """Share of rows of ``predicted`` (N, 2) within each threshold (km) of ``truth`` (N, 2)."""
    predicted, truth = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if predicted.shape != truth.shape or predicted.ndim != 2 or predicted.shape[1] != 2:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} must both be (N, 2) lat/lon")
    if len(predicted) == 0:
        raise ValueError("no predictions to score")
    distances = haversine_km(predicted[:, 0], predicted[:, 1], truth[:, 0], truth[:, 1])
    out = {f"within_{t}km": float((distances <= t).mean()) for t in thresholds}
    out["median_km"] = float(np.median(distances))
    return out


@dataclass
class GeoPrediction:
    place: Place
    country_probability: float
    city_probability: float  # within the chosen country for the hierarchical strategy

    @property
    def coordinates(self) -> tuple[float, float]:
        return self.place.latitude, self.place.longitude


class GeoLocator:
    """Zero-shot geolocation over a gazetteer: ``predict(images)`` -> one GeoPrediction per image."""

    def __init__(
        self,
        model,
        tokenizer,
        preprocess,
        gazetteer: Gazetteer,
        templates: dict | None = None,
        strategy: str = "hierarchical",
        batch_size: int = 256,
    ):
        if strategy not in ("hierarchical", "flat"):
            raise ValueError(f"strategy must be 'hierarchical' or 'flat', got {strategy!r}")
        self.model, self.preprocess, self.gazetteer, self.strategy = model, preprocess, gazetteer, strategy
        templates = {**DEFAULT_TEMPLATES, **(templates or {})}
        self.country_weights = class_embeddings(
            model, tokenizer, gazetteer.countries, templates["country"], batch_size
        )  # (C, E)
        self.city_weights = class_embeddings(
            model, tokenizer, [p.city_label for p in gazetteer.places], templates["city"], batch_size
        )  # (P, E)
        country_index = {c: i for i, c in enumerate(gazetteer.countries)}
        self.country_of_place = torch.tensor([country_index[p.country] for p in gazetteer.places])  # (P,)

    def _scale(self) -> torch.Tensor:
        return (
            self.model.logit_scale.detach().float().cpu().clamp(max=self.model.config.logit_scale_max).exp()
        )

    @torch.inference_mode()
    def predict(self, images) -> list[GeoPrediction]:
        pixels = (
            images if isinstance(images, torch.Tensor) else torch.stack([self.preprocess(i) for i in images])
        )
        features = self.model.encode_image(pixels, normalize=True).float().cpu()  # (B, E)
        scale = self._scale()
        country_probs = (scale * features @ self.country_weights.T).softmax(dim=-1)  # (B, C)
        city_logits = scale * features @ self.city_weights.T  # (B, P)
        if self.strategy == "hierarchical":
            chosen = country_probs.argmax(dim=-1)  # (B,)
            inside = self.country_of_place[None, :] == chosen[:, None]  # (B, P)
            city_logits = city_logits.masked_fill(~inside, -torch.inf)
        city_probs = city_logits.softmax(dim=-1)
        best = city_probs.argmax(dim=-1)
        out = []
        for row, index in enumerate(best.tolist()):
            place = self.gazetteer.places[index]
            country = int(self.country_of_place[index])
            out.append(
                GeoPrediction(place, float(country_probs[row, country]), float(city_probs[row, index]))
            )
        return out


def evaluate_geolocation(
    locator: GeoLocator, images, true_coordinates: np.ndarray, batch_size: int = 32, thresholds=THRESHOLDS_KM
) -> dict[str, float]:
    """IM2GPS-style scores of a locator on images with known (lat, lon)."""
    predicted = []
    for start in range(0, len(images), batch_size):
        predicted += [p.coordinates for p in locator.predict(images[start : start + batch_size])]
    return accuracy_within(np.array(predicted), np.asarray(true_coordinates), thresholds)


__all__ = [
    "Gazetteer",
    "GeoLocator",
    "GeoPrediction",
    "Place",
    "accuracy_within",
    "evaluate_geolocation",
    "haversine_km",
]
