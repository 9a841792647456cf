"""Training configs: typed command-line overrides, JSON round trip, validation, recipes."""

from __future__ import annotations

import pytest

from polyclip.train.config import TrainConfig, TrainConfigError, apply_overrides
from polyclip.train.launch import build_config
from polyclip.train.optim import learning_rate
from polyclip.train.recipes import RECIPES, get_recipe, list_recipes


def test_overrides_are_parsed_with_the_field_types():
    config = TrainConfig()
    apply_overrides(
        config,
        [
            "optim.lr=3e-4",
            "data.batch_size=32",
            "log.tensorboard=true",
            "augment.random_resized_crop=0.5,1.0",
            "augment.color_jitter=0.1,0.2,0.3,0.05",
            "optim.grad_clip_norm=none",
            "data.text_types=a,b",
            "model.architecture=tiny-vit",
        ],
    )
    assert config.optim.lr == 3e-4 and config.data.batch_size == 32 and config.log.tensorboard is True
    assert config.augment.random_resized_crop == (0.5, 1.0)
    assert config.augment.color_jitter == (0.1, 0.2, 0.3, 0.05)
    assert config.optim.grad_clip_norm is None and config.data.text_types == ("a", "b")


def test_override_reaches_into_the_model_config():
    config = TrainConfig()
    apply_overrides(
        config, ["model.config=tiny-vit", "model.config.vision.width=96", "model.config.embed_dim=48"]
    )
    assert config.model.config.vision.width == 96 and config.model.config.embed_dim == 48


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "no field 'lrr'"),
        ("optim.lr=fast", "could not convert"),
        ("log.jsonl=maybe", "true or false"),
        ("augment.random_resized_crop=0.5", "2 comma-separated"),
        ("optim", "section.field=value"),
        ("optim.lr.x=1", "not a section"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(TrainConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_json_round_trip_keeps_types():
    config = get_recipe("clip_rsicd", smoke=True)
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(TrainConfigError, match="unknown keys"):
        TrainConfig.from_dict({**config.to_dict(), "surprise": 1})


def test_validation_names_the_missing_field():
    config = get_recipe("clip")
    with pytest.raises(TrainConfigError, match="data.train is required"):
        config.validate()
    config.data.train = "pairs.csv"
    config.model.architecture = "tiny-vit"
    with pytest.raises(TrainConfigError, match="exactly one of"):
        config.validate()
    config.model.architecture = None
    config.micro_batch_size = 100
    with pytest.raises(TrainConfigError, match="micro_batch_size"):
        config.validate()


def test_every_recipe_builds_and_smoke_shrinks_it():
    assert set(list_recipes()) == set(RECIPES)
    for name in RECIPES:
        full = get_recipe(name)
        # the user supplies the data (and, for finetune, the checkpoint: --from DIR)
        assert (full.model.pretrained or name == "finetune") and not full.data.train
        smoke = build_config(name, [f"data.train={name}.csv"], smoke=True)
        assert smoke.model.config is not None and smoke.schedule.max_steps <= 3
        assert smoke.data.batch_size <= 8


def test_schedule_epochs_none_needs_max_steps():
    config = build_config("clip", ["data.train=x.csv", "schedule.epochs=none", "schedule.max_steps=5"])
    assert config.schedule.epochs is None and config.schedule.max_steps == 5
    with pytest.raises(TrainConfigError, match="schedule.epochs=none needs schedule.max_steps"):
        build_config("clip", ["data.train=x.csv", "schedule.epochs=none"])
    with pytest.raises(TrainConfigError, match="set exactly one of model.architecture"):
        build_config("finetune", ["data.train=x.csv"])


def test_recipe_facts():
    pubmed = get_recipe("pubmedclip")
    assert (pubmed.data.batch_size, pubmed.schedule.epochs, pubmed.optim.name) == (64, 50, "adam")
    assert (pubmed.optim.lr, pubmed.optim.weight_decay) == (1e-5, 5e-4)
    rsicd = get_recipe("clip_rsicd")
    assert rsicd.augment.random_crop == 0.8 and rsicd.augment.hflip and rsicd.augment.vflip
    assert rsicd.data.captions == "each" and rsicd.model.context_length == 32
    assert len(get_recipe("bioclip").data.text_types) == 5


def test_learning_rate_warmup_then_cosine_and_linear():
    schedule = get_recipe("clip").schedule
    schedule.warmup_steps, schedule.min_lr = 10, 0.0
    rates = [learning_rate(step, 1.0, 110, schedule) for step in range(110)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.5) and rates[-1] < 1e-3
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    schedule.decay = "linear"
    assert learning_rate(60, 1.0, 110, schedule) == pytest.approx(0.5)
    schedule.decay = "constant"
    assert learning_rate(100, 1.0, 110, schedule) == 1.0
