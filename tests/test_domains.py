"""StreetCLIP geolocation and BioCLIP taxonomy with a model whose embeddings make the answers known."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyclip.domains.geolocation import (
    Gazetteer,
    GazetteerError,
    GeoLocator,
    Place,
    accuracy_within,
    haversine_km,
)
from polyclip.domains.taxonomy import Taxon, TaxonomicClassifier, TaxonomyError, read_taxa


class KnownModel(torch.nn.Module):
    """Texts and images are embedded by look-up: each text maps to a chosen vector; an image tensor's
    first pixel is the row of the image table it stands for."""

    def __init__(self, text_vectors: dict[str, list[float]], image_vectors: list[list[float]], scale=100.0):
        super().__init__()
        self.texts = list(text_vectors)
        self.text_table = torch.tensor([text_vectors[t] for t in self.texts], dtype=torch.float32)
        self.image_table = torch.tensor(image_vectors, dtype=torch.float32)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(scale))))
        self.logit_bias = None
        self.config = types.SimpleNamespace(
            embed_dim=self.text_table.shape[1], logit_scale_max=float(np.log(100))
        )

    def encode_text(self, ids, normalize=False):
        out = self.text_table[ids[:, 0]]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, pixels, normalize=False):
        out = self.image_table[pixels[:, 0, 0, 0].long()]
        return F.normalize(out, dim=-1) if normalize else out


class KnownTokenizer:
    pad_token_id = -1

    def __init__(self, texts):
        self.index = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts):
        missing = [t for t in texts if t not in self.index]
        assert not missing, f"the test did not give these texts a vector: {missing}"
        return torch.tensor([[self.index[t]] for t in texts], dtype=torch.long)


def images(*rows):
    pixels = torch.zeros(len(rows), 3, 2, 2)
    pixels[:, 0, 0, 0] = torch.tensor(rows, dtype=torch.float32)
    return pixels


PLACES = [
    Place("Paris", "Ile-de-France", "France", 48.8566, 2.3522),
    Place("Lyon", "Auvergne-Rhone-Alpes", "France", 45.7640, 4.8357),
    Place("Madrid", "Community of Madrid", "Spain", 40.4168, -3.7038),
]


def test_haversine_known_distances():
    assert haversine_km(48.8566, 2.3522, 51.5074, -0.1278) == pytest.approx(343.5, abs=1.0)  # Paris-London
    assert haversine_km(0, 0, 0, 180) == pytest.approx(np.pi * 6371.0088, rel=1e-9)
    assert haversine_km(10, 20, 10, 20) == 0


def test_accuracy_within_thresholds():
    truth = np.array([[48.8566, 2.3522]] * 4)
    predicted = np.array([[48.8566, 2.3522], [45.7640, 4.8357], [40.4168, -3.7038], [-33.87, 151.21]])
    scores = accuracy_within(predicted, truth)
    # distances: 0, ~392 km (Lyon), ~1053 km (Madrid), ~16,960 km (Sydney)
    assert scores["within_25km"] == 0.25
    assert scores["within_200km"] == 0.25
    assert scores["within_750km"] == 0.5
    assert scores["within_2500km"] == 0.75
    with pytest.raises(ValueError, match="no predictions"):
        accuracy_within(np.zeros((0, 2)), np.zeros((0, 2)))


def _locator(strategy):
    # axes: 0 France, 1 Spain, 2 Paris, 3 Lyon, 4 Madrid
    texts = {
        "A Street View photo in France.": [1, 0, 0, 0, 0],
        "A Street View photo in Spain.": [0, 1, 0, 0, 0],
        "A Street View photo from Paris, Ile-de-France, France.": [0.3, 0, 1, 0, 0],
        "A Street View photo from Lyon, Auvergne-Rhone-Alpes, France.": [0.3, 0, 0, 1, 0],
        "A Street View photo from Madrid, Community of Madrid, Spain.": [0, 0.3, 0, 0, 1],
    }
    image_vectors = [
        [1.0, 0.0, 0.1, 0.9, 0.0],  # clearly Lyon
        [1.0, 0.2, 0.0, 0.0, 1.5],  # France by country prompt, Madrid by city prompt
    ]
    model = KnownModel(texts, image_vectors)
    return GeoLocator(model, KnownTokenizer(list(texts)), None, Gazetteer(PLACES), strategy=strategy)


def test_geolocator_hierarchical_and_flat():
    hierarchical = _locator("hierarchical").predict(images(0, 1))
    assert [p.place.city for p in hierarchical] == ["Lyon", "Paris"]  # image 1 stays inside France
    flat = _locator("flat").predict(images(0, 1))
    assert [p.place.city for p in flat] == ["Lyon", "Madrid"]
    assert hierarchical[0].coordinates == (45.7640, 4.8357)
    assert 0 < hierarchical[0].city_probability <= 1 and 0 < hierarchical[0].country_probability <= 1


def test_gazetteer_csv_and_errors(tmp_path):
    path = tmp_path / "places.csv"
    path.write_text("city,region,country,latitude,longitude\nParis,IDF,France,48.85,2.35\n")
    assert Gazetteer.from_csv(path).countries == ["France"]
    path.write_text("city,country\nParis,France\n")
    with pytest.raises(GazetteerError, match="missing columns"):
        Gazetteer.from_csv(path)
    path.write_text("city,region,country,latitude,longitude\nParis,IDF,France,north,2.35\n")
    with pytest.raises(GazetteerError, match="line 2"):
        Gazetteer.from_csv(path)
    with pytest.raises(GazetteerError, match="coordinates"):
        Gazetteer([Place("X", "", "Y", 123.0, 0.0)])


RAVEN = Taxon("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax", "common raven")
CROW = Taxon("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corone", "carrion crow")
JAY = Taxon(
    "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Garrulus", "glandarius", "Eurasian jay"
)
ROBIN = Taxon("Animalia", "Chordata", "Aves", "Passeriformes", "Muscicapidae", "Erithacus", "rubecula", "")


def test_taxon_text_types():
    assert RAVEN.text("taxonomic") == "a photo of Animalia Chordata Aves Passeriformes Corvidae Corvus corax."
    assert RAVEN.text("scientific") == "a photo of Corvus corax."
    assert RAVEN.text("common") == "a photo of common raven."
    assert RAVEN.text("scientific_common") == "a photo of Corvus corax with common name common raven."
    assert RAVEN.text("taxonomic_common").endswith("Corvus corax with common name common raven.")
    assert ROBIN.text("common") == "a photo of Erithacus rubecula."  # no common name: the scientific one
    with pytest.raises(TaxonomyError):
        RAVEN.text("poetic")


def _classifier():
    taxa = [RAVEN, CROW, JAY, ROBIN]
    texts = {t.text("scientific"): v for t, v in zip(taxa, np.eye(4).tolist())}
    # the image sits between raven and crow, slightly nearer the crow; a little like a robin
    model = KnownModel(texts, [[0.50, 0.52, 0.0, 0.30]], scale=10.0)
    return TaxonomicClassifier(model, KnownTokenizer(list(texts)), None, taxa, text_type="scientific")


def test_rank_probabilities_are_sums_of_species():
    classifier = _classifier()
    species = classifier.species_probabilities(images(0))[0]
    assert classifier.predict(images(0), rank="species", k=1)[0][0][0][-1] == "corone"
    genus = dict(classifier.predict(images(0), rank="genus", k=4)[0])
    corvus = ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus")
    assert genus[corvus] == pytest.approx(float(species[0] + species[1]), abs=1e-6)
    family = classifier.predict(images(0), rank="family", k=2)[0]
    assert family[0][0][-1] == "Corvidae" and family[0][1] == pytest.approx(
        float(species[:3].sum()), abs=1e-6
    )


def test_within_a_taxon_renormalises_over_its_species():
    classifier = _classifier()
    inside = classifier.species_probabilities(images(0), within={"family": "Muscicapidae"})[0]
    assert inside[3] == pytest.approx(1.0) and inside[:3].sum() == 0
    with pytest.raises(TaxonomyError, match="no taxon matches"):
        classifier.species_probabilities(images(0), within={"genus": "Pica"})


def test_read_taxa_csv(tmp_path):
    path = tmp_path / "taxa.csv"
    path.write_text(
        "kingdom,phylum,class,order,family,genus,species,common_name\n"
        "Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,corax,common raven\n"
    )
    assert read_taxa(path) == [RAVEN]
    path.write_text("kingdom,genus\nAnimalia,Corvus\n")
    with pytest.raises(TaxonomyError, match="missing columns"):
        read_taxa(path)


def test_domain_commands_end_to_end(tiny_hf_clip_dir, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from polyclip.cli import app

    image = tmp_path / "street.png"
    Image.new("RGB", (40, 40), (120, 120, 120)).save(image)
    places = tmp_path / "places.csv"
    places.write_text(
        "city,region,country,latitude,longitude\n"
        + "\n".join(f"{p.city},{p.region},{p.country},{p.latitude},{p.longitude}" for p in PLACES)
    )
    runner = CliRunner()
    result = runner.invoke(
        app, ["geolocate", str(image), "--gazetteer", str(places), "--model", str(tiny_hf_clip_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    row = __import__("json").loads(result.output)[0]
    assert row["city"] in {"Paris", "Lyon", "Madrid"}
    taxa = tmp_path / "taxa.csv"
    taxa.write_text(
        "kingdom,phylum,class,order,family,genus,species,common_name\n"
        + "\n".join(",".join([*t.path(), t.common_name]) for t in (RAVEN, CROW, JAY, ROBIN))
    )
    result = runner.invoke(
        app,
        [
            "taxonomy",
            str(image),
            "--taxa",
            str(taxa),
            "--model",
            str(tiny_hf_clip_dir),
            "--rank",
            "genus",
            "--within",
            "family=Corvidae",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    ranking = __import__("json").loads(result.output)[str(image)]
    assert {r["taxon"].split()[-1] for r in ranking} <= {"Corvus", "Garrulus"}
    assert sum(r["probability"] for r in ranking) == pytest.approx(1.0, abs=1e-5)
