"""Hierarchy: roll-up sums, per-rank accuracy, top-down decisions, CSV errors."""

import pytest
import torch

from polyclip.eval import runner
from polyclip.eval.data import read_image_folder
from polyclip.eval.errors import DataError, EvalError
from polyclip.eval.features import EncodeConfig
from polyclip.eval.hierarchy import Hierarchy, accuracy_per_rank, predict_ranks, roll_up
from test_eval_support import colour_folder, fake_triple

PLACES = Hierarchy(
    ("country", "region", "city"),
    (
        ("France", "Ile-de-France", "Paris"),
        ("France", "Provence", "Marseille"),
        ("France", "Provence", "Nice"),
        ("Spain", "Catalonia", "Barcelona"),
        ("Spain", "Madrid", "Madrid city"),
    ),
)


def test_roll_up_sums_leaf_probabilities():
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]])
    countries, regions, cities = roll_up(probabilities, PLACES)
    torch.testing.assert_close(countries, torch.tensor([[0.6, 0.4]]))
    torch.testing.assert_close(regions, torch.tensor([[0.1, 0.5, 0.25, 0.15]]))
    torch.testing.assert_close(cities, probabilities)


def test_accuracy_per_rank_and_top_down():
    # Sample 0 is a Nice image; the best city is Barcelona (0.35) but France holds 0.65.
    probabilities = torch.tensor([[0.05, 0.3, 0.3, 0.35, 0.0], [0.0, 0.0, 0.0, 0.1, 0.9]])
    true = [2, 4]  # Nice, Madrid city
    rollup = accuracy_per_rank(probabilities, true, PLACES, "rollup")
    assert rollup == {"country": 1.0, "region": 1.0, "city": 0.5}
    top_down = predict_ranks(probabilities, PLACES, "top_down")
    assert top_down[0].tolist() == [0, 1]  # France, Spain
    assert top_down[1].tolist() == [1, 3]  # Provence (inside France), Madrid region
    assert top_down[2].tolist() == [1, 4]  # Marseille (first of the tied Provence cities), Madrid city
    assert accuracy_per_rank(probabilities, true, PLACES, "top_down")["city"] == 0.5
    with pytest.raises(EvalError, match="unknown hierarchy mode"):
        predict_ranks(probabilities, PLACES, "sideways")


def test_same_name_under_two_parents_stays_apart():
    hierarchy = Hierarchy(("state", "city"), (("A", "Springfield"), ("B", "Shelbyville")))
    assert hierarchy.groups(0)[1] == [("A",), ("B",)]
    with pytest.raises(DataError, match="unique"):
        Hierarchy(("state", "city"), (("A", "Springfield"), ("B", "Springfield")))


def test_hierarchy_csv(tmp_path):
    (tmp_path / "h.csv").write_text("colour_family,colour\nwarm,red\nwarm,yellow\ncool,blue\ncool,green\n")
    hierarchy = Hierarchy.from_csv(tmp_path / "h.csv")
    assert hierarchy.ranks == ("colour_family", "colour")
    assert hierarchy.aligned_to(["blue", "red"]).leaf_names == ["blue", "red"]
    with pytest.raises(DataError, match="missing from the hierarchy"):
        hierarchy.aligned_to(["purple"])
    (tmp_path / "bad.csv").write_text("a,b\nx\n")
    with pytest.raises(DataError, match="line 2: 1 cells for 2 ranks"):
        Hierarchy.from_csv(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="at least one leaf row"):
        Hierarchy.from_csv(tmp_path / "short.csv")


def test_hierarchical_protocol_end_to_end(tmp_path):
    (tmp_path / "h.csv").write_text("family,colour\nwarm,red\nwarm,yellow\ncool,blue\ncool,green\n")
    data = read_image_folder(
        colour_folder(tmp_path / "data", ["red", "yellow", "blue", "green"], per_class=2)
    )
    run = runner.RunConfig(encode=EncodeConfig(batch_size=8, num_workers=0))
    config = runner.HierarchyConfig(templates="simple")
    report = runner.run_hierarchical(
        [fake_triple()], data, Hierarchy.from_csv(tmp_path / "h.csv"), config, run
    )
    metrics = report.results[0].metrics
    assert metrics["rollup_family_accuracy"] == 1.0 and metrics["top_down_colour_accuracy"] == 1.0
    assert report.results[0].details["logit_scale"] == pytest.approx(100.0)
