"""WEAT effect size and permutation p-values against hand computations and brute force."""

import itertools
import json

import numpy as np
import pytest
import torch

from polyclip.eval import runner
from polyclip.eval.bias import BiasTest, EmbeddingSet, association_scores, load_bias_tests, weat
from polyclip.eval.errors import DataError, EvalError
from polyclip.eval.features import EncodeConfig
from test_eval_support import COLOURS, fake_triple, save_square


def random_sets(seed, shift=0.0, n=4, dim=6):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(3, dim, generator=generator)
    b = torch.randn(3, dim, generator=generator)
    x = torch.randn(n, dim, generator=generator) + shift * a.mean(dim=0)
    y = torch.randn(n, dim, generator=generator) + shift * b.mean(dim=0)
    return x, y, a, b


def cos(u, v):
    return float(u @ v / (u.norm() * v.norm()))


def test_effect_size_by_hand():
    x, y, a, b = random_sets(0)
    s = [np.mean([cos(w, ai) for ai in a]) - np.mean([cos(w, bi) for bi in b]) for w in torch.cat([x, y])]
    np.testing.assert_allclose(association_scores(torch.cat([x, y]), a, b), s, rtol=1e-6)
    expected = (np.mean(s[:4]) - np.mean(s[4:])) / np.std(s, ddof=1)
    result = weat(x, y, a, b)
    assert result.effect_size == pytest.approx(expected, rel=1e-6)
    assert result.statistic == pytest.approx(sum(s[:4]) - sum(s[4:]), rel=1e-6)


def test_exact_p_value_equals_brute_force():
    x, y, a, b = random_sets(1, shift=0.5)
    s = association_scores(torch.cat([x, y]), a, b)
    observed = s[:4].sum() - s[4:].sum()
    statistics = [s[list(i)].sum() - np.delete(s, list(i)).sum() for i in itertools.combinations(range(8), 4)]
    expected = np.mean(np.array(statistics) >= observed - 1e-12)
    result = weat(x, y, a, b)
    assert result.exact and result.num_partitions == 70
    assert result.p_value == pytest.approx(expected)
    two_sided = np.mean(np.abs(statistics) >= abs(observed) - 1e-12)  # |X| = |Y|: centred on 0
    assert result.p_value_two_sided == pytest.approx(two_sided)


def test_a_strong_negative_association_is_significant_only_two_sided():
    x, y, a, b = random_sets(4, shift=3.0, n=5)
    reversed_ = weat(y, x, a, b)  # Y (with A) as the first group: X-with-B
    assert reversed_.effect_size < -1.0
    assert reversed_.p_value > 0.95 and reversed_.p_value_two_sided < 0.05
    forward = weat(x, y, a, b)
    assert forward.p_value_two_sided == pytest.approx(reversed_.p_value_two_sided)
    assert forward.p_value <= forward.p_value_two_sided


def test_sampled_p_value_is_seeded_and_close_to_exact():
    x, y, a, b = random_sets(2, shift=0.3, n=6)
    exact = weat(x, y, a, b)
    sampled = weat(x, y, a, b, num_permutations=20000, seed=3, max_exact=10)
    again = weat(x, y, a, b, num_permutations=20000, seed=3, max_exact=10)
    assert not sampled.exact and sampled.p_value == again.p_value
    assert sampled.p_value == pytest.approx(exact.p_value, abs=0.02)


def test_strong_association_gives_large_effect_and_small_p():
    x, y, a, b = random_sets(4, shift=4.0, n=8)
    result = weat(x, y, a, b)
    assert result.effect_size > 1.5 and result.p_value < 0.01
    reverse = weat(y, x, a, b)
    assert reverse.effect_size == pytest.approx(-result.effect_size) and reverse.p_value > 0.9


def test_identical_scores_give_nan_effect():
    same = torch.ones(3, 4)
    result = weat(same[:2], same[2:], torch.eye(4)[:1], torch.eye(4)[1:2])
    assert np.isnan(result.effect_size)


def test_too_few_targets():
    with pytest.raises(EvalError, match="at least three"):
        weat(torch.randn(1, 3), torch.randn(1, 3), torch.randn(2, 3), torch.randn(2, 3))


def test_bias_tests_file_and_protocol(tmp_path):
    for i in range(3):
        save_square(tmp_path / "red_images" / f"{i}.png", COLOURS["red"])
    tests = {
        "tests": [
            {
                "name": "warmth",
                "x": {"label": "red things", "images": "red_images"},
                "y": ["a blue car", "a blue sky", "a cyan wall"],
                "a": ["a red alarm", "a yellow sun"],
                "b": {"prompts": ["a blue sea", "a cyan pool"]},
            }
        ]
    }
    (tmp_path / "tests.json").write_text(json.dumps(tests))
    loaded = load_bias_tests(tmp_path / "tests.json")
    assert loaded[0].targets_x.image_folder == tmp_path / "red_images"
    run = runner.RunConfig(encode=EncodeConfig(batch_size=4, num_workers=0))
    report = runner.run_bias([("fake", *fake_triple(seed=2))], loaded, runner.BiasConfig(), run)
    metrics = report.results[0].metrics
    assert metrics["warmth_effect_size"] > 1.0 and metrics["warmth_p_value"] <= 0.1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"tests": []}, "non-empty list"),
        ({"tests": [{"name": "t", "x": ["a"], "y": ["b"], "a": ["c"]}]}, "lacks b"),
        ({"tests": [{"name": "t", "x": [], "y": ["b"], "a": ["c"], "b": ["d"]}]}, "t.*x"),
        (
            {"tests": [{"name": "t", "x": {"images": "nowhere"}, "y": ["b"], "a": ["c"], "b": ["d"]}]},
            "does not exist",
        ),
    ],
)
def test_bias_tests_file_errors(tmp_path, payload, message):
    (tmp_path / "t.json").write_text(json.dumps(payload))
    with pytest.raises(DataError, match=message):
        load_bias_tests(tmp_path / "t.json")


@pytest.mark.slow
def test_a_planted_association_is_found_and_a_control_is_not(tmp_path):
    """Train the demo's model on shapes whose captions call every circle "happy" and every square "sad"
    (a control run: the same images without those words); the probe flags only the planted one."""
    import polyclip
    from polyclip.train.demo import demo_config
    from polyclip.train.demo.shapes import COLOURS as SHAPE_COLOURS
    from polyclip.train.demo.shapes import SHAPES, random_spec, render
    from polyclip.train.trainer import train

    rng = np.random.default_rng(0)
    combinations = [(c, s) for c in SHAPE_COLOURS for s in SHAPES]
    specs = [random_spec(rng, combinations) for _ in range(1500)]
    (tmp_path / "images").mkdir()
    for n, spec in enumerate(specs):
        render(spec, 32, np.random.default_rng([1, n])).save(tmp_path / "images" / f"{n}.png")
    mood = {"circle": "happy ", "square": "sad "}
    targets = {}
    for shape in ("circle", "square"):
        for n, colour in enumerate(list(SHAPE_COLOURS) * 4):
            folder = tmp_path / "targets" / shape
            folder.mkdir(parents=True, exist_ok=True)
            spec = random_spec(np.random.default_rng([2, n]), [(colour, shape)])
            render(spec, 32, np.random.default_rng([3, shape == "circle", n])).save(folder / f"{n}.png")
        targets[shape] = folder
    tests = [
        BiasTest(
            "planted",
            EmbeddingSet("circles", image_folder=targets["circle"]),
            EmbeddingSet("squares", image_folder=targets["square"]),
            EmbeddingSet("happy", ["happy", "a happy shape", "a happy thing"]),
            EmbeddingSet("sad", ["sad", "a sad shape", "a sad thing"]),
        )
    ]
    results = {}
    for name, words in (("planted", mood), ("control", {})):
        lines = [
            json.dumps(
                {"image": f"images/{n}.png", "captions": [f"a {words.get(s.shape, '')}{s.colour} {s.shape}"]}
            )
            for n, s in enumerate(specs)
        ]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        config = demo_config(tmp_path, tmp_path / f"run_{name}", steps=150, seed=0, verbose=False)
        config.data.train = str(tmp_path / f"{name}.jsonl")
        config.eval.zero_shot = config.eval.retrieval = None
        config.log.plots = False
        result = train(config)
        model = polyclip.load(result.model_dir)
        run = runner.RunConfig(encode=EncodeConfig(batch_size=64, num_workers=0))
        report = runner.run_bias([(name, *model)], tests, runner.BiasConfig(num_permutations=5000), run)
        results[name] = report.results[0].metrics
    planted, control = results["planted"], results["control"]
    # a medium effect (> 0.5 standard deviations), significant; the control run is not flagged
    assert planted["planted_effect_size"] > 0.5 and planted["planted_p_value"] <= 0.025, planted
    assert control["planted_p_value_two_sided"] > 0.05, control
