"""Linear probes: the chosen regularisation, agreement with scikit-learn, the PLIP protocol."""

import numpy as np
import pytest

from polyclip.eval import runner
from polyclip.eval.data import read_image_folder
from polyclip.eval.errors import EvalError
from polyclip.eval.features import EncodeConfig
from polyclip.eval.probe import ProbeConfig, linear_probe, stratified_split
from test_eval_support import colour_folder, fake_triple

linear_model = pytest.importorskip("sklearn.linear_model")


def blobs(seed, per_class=40, num_classes=4, dim=8, spread=0.6):
    centres = np.random.default_rng(100).normal(size=(num_classes, dim)) * 2  # shared by every split
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    return (centres[labels] + spread * rng.normal(size=(labels.size, dim))).astype(np.float32), labels


def test_logreg_probe_matches_sklearn_with_the_chosen_c():
    train_x, train_y = blobs(0)
    test_x, test_y = blobs(1, per_class=20)
    val_x, val_y = blobs(2, per_class=10)
    config = ProbeConfig(refine_rounds=2)
    result = linear_probe(train_x, train_y, test_x, test_y, 4, config, val_x, val_y)
    assert result.hyperparameter == "C" and result.selection_metric == "accuracy"
    best_val = max(score for _, score in result.search)
    assert dict(result.search)[result.chosen] == best_val
    reference = linear_model.LogisticRegression(C=result.chosen, max_iter=1000).fit(
        np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    )
    expected_accuracy = (reference.predict(test_x) == test_y).mean()
    assert result.metrics.accuracy == pytest.approx(expected_accuracy)
    assert result.metrics.accuracy > 0.9
    assert len(result.search) >= len(config.c_grid)


def test_plip_protocol_uses_its_alpha_grid_and_macro_f1():
    train_x, train_y = blobs(3)
    test_x, test_y = blobs(4, per_class=15)
    config = ProbeConfig(protocol="plip", seed=7)
    result = linear_probe(train_x, train_y, test_x, test_y, 4, config)
    assert result.hyperparameter == "alpha" and result.selection_metric == "macro_f1"
    assert result.chosen in config.plip_alphas
    assert [value for value, _ in result.search] == sorted(config.plip_alphas)
    assert result.metrics.macro_f1 > 0.85


def test_stratified_split_keeps_every_class_in_training():
    labels = np.array([0] * 10 + [1] * 3 + [2])
    train, held = stratified_split(labels, 0.3, seed=0)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(14))
    assert np.bincount(labels[held], minlength=3).tolist() == [3, 1, 0]
    assert set(labels[train]) == {0, 1, 2}
    train_again, held_again = stratified_split(labels, 0.3, seed=0)
    assert train.tolist() == train_again.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"config": ProbeConfig(protocol="svm")}, "unknown probe protocol"),
        ({"config": ProbeConfig(val_fraction=1.5)}, "val_fraction"),
        ({"train_y": np.zeros(20, dtype=int)}, "at least two classes"),
    ],
)
def test_probe_errors(kwargs, message):
    x, y = blobs(0, per_class=5)
    arguments = {"train_x": x, "train_y": y, "config": ProbeConfig()}
    arguments.update(kwargs)
    with pytest.raises(EvalError, match=message):
        linear_probe(arguments["train_x"], arguments["train_y"], x, y, 4, arguments["config"])


def test_probe_protocol_end_to_end(tmp_path):
    colours = ["red", "green", "blue"]
    train = read_image_folder(colour_folder(tmp_path / "train", colours, per_class=4))
    test = read_image_folder(colour_folder(tmp_path / "test", colours, per_class=2))
    run = runner.RunConfig(encode=EncodeConfig(batch_size=8, num_workers=0))
    report = runner.run_linear_probe([fake_triple()], train, test, ProbeConfig(refine_rounds=0), run)
    metrics = report.results[0].metrics
    assert metrics["accuracy"] == 1.0 and "chosen_C" in metrics
    other = read_image_folder(colour_folder(tmp_path / "other", ["red", "cyan"], per_class=1))
    with pytest.raises(EvalError, match="classes differ"):
        runner.run_linear_probe([fake_triple()], train, other, ProbeConfig(), run)
