"""The trainer on tiny models: exact resume, unreadable images, exact accumulation, LiT, evaluation and
logging, exports that reload in transformers, WiSE-FT, the optimiser's groups and the scale clamp."""

from __future__ import annotations

import json
import math

import pytest
import torch

import polyclip
from polyclip.tokenizers import ClipTokenizer
from polyclip.train.config import TrainConfig, apply_overrides
from polyclip.train.optim import build_optimizer
from polyclip.train.step import ContrastiveForward, StepInputs, build_loss, forward_backward
from polyclip.train.trainer import Trainer, train
from polyclip.train.wise_ft import WiseFtError, wise_ft
from polyclip.transforms import PreprocessConfig
from test_train_fixtures import colour_pairs, single_thread, write_image_folder, write_jsonl  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return write_jsonl(root / "pairs.jsonl", colour_pairs(root, 24))


def make_config(tmp_path, data, *overrides: str) -> TrainConfig:
    config = TrainConfig(name="test", output_dir=str(tmp_path / "run"), device="cpu")
    apply_overrides(
        config,
        [
            "model.architecture=tiny-vit",
            f"data.train={data}",
            "data.batch_size=8",
            "data.num_workers=0",
            "schedule.max_steps=4",
            "schedule.warmup_steps=2",
            "optim.lr=1e-3",
            "log.every_steps=1",
            "log.progress=false",
            "log.plots=false",
            *overrides,
        ],
    )
    return config


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    train_records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    # the loader's share of the time is reported beside the throughput
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 and r["samples_per_second"] > 0 for r in train_records)
    return {r["step"]: r["loss"] for r in train_records}


def test_resume_from_a_mid_epoch_checkpoint_reproduces_the_losses(tmp_path, pairs):
    # 24 pairs / batch 8 = 3 steps per epoch; the checkpoint at step 4 sits inside the second epoch.
    augment = ["augment.random_resized_crop=0.5,1.0", "augment.hflip=0.5", "augment.color_jitter=0.3,0.3,0.3"]
    common = [*augment, "schedule.max_steps=7"]
    whole = train(
        make_config(tmp_path / "whole", pairs, *common, "checkpoint.every_steps=2", "checkpoint.keep_last=3")
    )
    checkpoints = sorted((tmp_path / "whole" / "run" / "checkpoints").iterdir())
    # saved at 2, 3 (epoch end), 4, 6 and 7 (the end); only the newest 3 are kept
    assert [p.name for p in checkpoints] == ["step_00000004", "step_00000006", "step_00000007"]
    state = torch.load(checkpoints[0] / "trainer_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 1)
    result = train(make_config(tmp_path / "resumed", pairs, *common, f"checkpoint.resume={checkpoints[0]}"))
    expected, got = _losses(tmp_path / "whole" / "run"), _losses(tmp_path / "resumed" / "run")
    assert sorted(got) == [5, 6, 7]
    assert [got[s] for s in (5, 6, 7)] == [expected[s] for s in (5, 6, 7)]  # exactly, not approximately
    final_whole, _, _ = polyclip.load(whole.model_dir)
    final_resumed, _, _ = polyclip.load(result.model_dir)
    for (name, a), (_, b) in zip(final_whole.state_dict().items(), final_resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_latest_continues_in_the_same_run_folder(tmp_path, pairs):
    train(make_config(tmp_path, pairs, "schedule.max_steps=3"))
    result = train(make_config(tmp_path, pairs, "schedule.max_steps=5", "checkpoint.resume=latest"))
    assert result.steps == 5
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4, 5]  # one continuous metrics file


def test_corrupt_and_missing_images_are_skipped_and_reported(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", colour_pairs(tmp_path, 16, corrupt=2, missing=1))
    result = train(make_config(tmp_path, data, "schedule.max_steps=4"))  # two epochs: every image is drawn
    assert result.steps == 4 and math.isfinite(result.last_loss)
    assert result.skipped_images >= 6  # 3 unreadable files, each met once per epoch
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == result.skipped_images
    assert any("0002.png" in example for example in summary["skipped_examples"])  # the missing one


def test_empty_dataset_is_a_clear_error(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Trainer(make_config(tmp_path, data))
    few = write_jsonl(tmp_path / "few.jsonl", colour_pairs(tmp_path, 3))
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(make_config(tmp_path, few))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("architecture, kind", [("tiny-vit", "clip"), ("tiny-siglip", "siglip")])
def test_exact_accumulation_equals_one_step(architecture, kind):
    torch.manual_seed(0)
    model = polyclip.create_model(architecture)
    from polyclip.train.config import LossConfig

    loss_fn, uses_bias = build_loss(LossConfig(kind=kind), model)
    inputs = StepInputs(ContrastiveForward(model), loss_fn, uses_bias, _nullcontext, _nullcontext)
    pixels = torch.randn(8, 3, 32, 32)
    tokens = torch.randint(1, 1000, (8, model.context_length))
    tokens[:, 5] = model.config.text.eos_token_id if kind == "clip" else tokens[:, 5]
    one = forward_backward(inputs, pixels, tokens)
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    accumulated = forward_backward(inputs, pixels, tokens, micro_batch_size=2)
    got = _grads(model)
    assert torch.allclose(one, accumulated, atol=1e-6)
    assert expected.keys() == got.keys() and "logit_scale" in got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_lit_locks_the_image_tower_but_its_last_block(tmp_path, pairs):
    config = make_config(
        tmp_path, pairs, "model.lock_image=true", "model.lock_image_unlocked_blocks=1", "schedule.max_steps=2"
    )
    trainer = Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert not any(
        n.startswith("visual.transformer.blocks.0.") or n.startswith("visual.patch_embed") for n in changed
    )
    assert any(n.startswith("visual.transformer.blocks.1.") for n in changed)
    assert "visual.proj.weight" in changed and any(n.startswith("text.") for n in changed)


def test_locked_resnet_keeps_its_batchnorm_statistics(tmp_path, pairs):
    config = make_config(
        tmp_path, pairs, "model.architecture=tiny-resnet", "model.lock_image=true", "schedule.max_steps=2"
    )
    trainer = Trainer(config)
    stats = {n: b.clone() for n, b in trainer.model.visual.named_buffers()}
    trainer.fit()
    for name, value in trainer.model.visual.named_buffers():
        assert torch.equal(value, stats[name]), name


def test_evaluation_logging_plots_and_tensorboard(tmp_path, pairs):
    folder = write_image_folder(tmp_path / "labelled")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    config = make_config(
        tmp_path, pairs, f"eval.zero_shot={folder}", f"eval.retrieval={pairs}", "eval.every_steps=2", "eval.every_epochs=none",
        "log.plots=true", "log.tensorboard=true", "precision=bf16",
    )  # fmt: skip
    result = train(config)
    assert {"zero_shot/accuracy", "zero_shot/macro_f1", "retrieval/t2i_R@5", "retrieval/i2t_R@1"} <= set(
        result.eval_metrics
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 0 and (run / "eval.png").stat().st_size > 0
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_exported_transformers_folder_reloads_with_equal_outputs(tmp_path, pairs):
    transformers = pytest.importorskip("transformers")
    result = train(
        make_config(
            tmp_path,
            pairs,
            "checkpoint.export_hf=true",
            "checkpoint.export_open_clip=true",
            "schedule.max_steps=1",
        )
    )
    ours, preprocess, tokenizer = polyclip.load(result.model_dir)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["a red square", "something blue"])
    theirs = transformers.CLIPModel.from_pretrained(result.exports["hf"]).eval()
    reloaded, _, _ = polyclip.load(result.exports["hf"])
    with torch.no_grad():
        expected_image, expected_text = ours.encode_image(pixels), ours.encode_text(tokens)
        hf_image = theirs.get_image_features(pixel_values=pixels)
        hf_text = theirs.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long())
        hf_image = getattr(hf_image, "pooler_output", hf_image)
        hf_text = getattr(hf_text, "pooler_output", hf_text)
        torch.testing.assert_close(hf_image, expected_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf_text, expected_text, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded.encode_image(pixels), expected_image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded.encode_text(tokens), expected_text, atol=1e-5, rtol=1e-5)
    assert (result.exports["open_clip"] / "open_clip_config.json").is_file()


def test_wise_ft_interpolates_weights(tmp_path, pairs):
    torch.manual_seed(0)
    start = polyclip.create_model("tiny-vit")
    preprocess = PreprocessConfig(image_size=32)
    pretrained = polyclip.save(start, preprocess, ClipTokenizer(), tmp_path / "zs")
    config = make_config(
        tmp_path,
        pairs,
        f"model.pretrained={pretrained}",
        "model.architecture=none",
        "checkpoint.wise_ft_alphas=0.5",
    )
    result = train(config)
    zero_shot, _, _ = polyclip.load(pretrained)
    fine_tuned, _, _ = polyclip.load(result.model_dir)
    mixed, _, _ = polyclip.load(result.exports["wise_ft_0.5"])
    for name, value in mixed.state_dict().items():
        expected = (zero_shot.state_dict()[name] + fine_tuned.state_dict()[name]) / 2
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
    assert torch.equal(wise_ft(zero_shot, fine_tuned, 0.0).visual.proj.weight, zero_shot.visual.proj.weight)
    assert torch.equal(wise_ft(zero_shot, fine_tuned, 1.0).visual.proj.weight, fine_tuned.visual.proj.weight)
    with pytest.raises(WiseFtError, match="different architectures"):
        wise_ft(zero_shot, polyclip.create_model("tiny-siglip"), 0.5)
    with pytest.raises(WiseFtError, match="alpha"):
        wise_ft(zero_shot, fine_tuned, 1.5)


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_parameters():
    model = polyclip.create_model("tiny-siglip")
    optimizer = build_optimizer(model, TrainConfig().optim)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    plain = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    for name in ("logit_scale", "logit_bias", "text.token_embedding.weight", "text.pos_embed", "visual.pos_embed",
                 "visual.head.probe", "visual.norm.weight", "visual.patch_embed.bias"):  # fmt: skip
        assert name in plain, name
    assert "visual.transformer.blocks.0.attn.qkv.weight" in decay and "text.proj.weight" in decay


def test_logit_scale_is_clamped_after_each_step(tmp_path, pairs):
    trainer = Trainer(make_config(tmp_path, pairs, "optim.lr=0.5", "optim.grad_clip_norm=none"))
    with torch.no_grad():
        trainer.model.logit_scale.fill_(4.6)
    batch = next(iter(trainer.data.loader(0, 0)))
    for _ in range(3):
        trainer.train_step(batch.pixels, batch.token_ids)
        trainer.step += 1
        assert 0.0 <= float(trainer.model.logit_scale.detach()) <= math.log(100) + 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    from polyclip.train.config import LossConfig

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = polyclip.create_model("tiny-vit")
        model.set_grad_checkpointing(checkpointing)
        loss_fn, uses_bias = build_loss(LossConfig(), model)
        inputs = StepInputs(ContrastiveForward(model), loss_fn, uses_bias, _nullcontext, _nullcontext)
        tokens = torch.randint(1, 1000, (4, 8))
        tokens[:, -1] = 49407
        forward_backward(
            inputs, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), tokens
        )
        grads.append(_grads(model))
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_clipping_bounds_the_total_norm():
    from polyclip.train.trainer import clip_gradients

    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    parameters[0].grad = torch.tensor([3.0, 0.0, 0.0])
    parameters[1].grad = torch.full((2, 2), 2.0)
    assert clip_gradients(parameters, max_norm=None) == pytest.approx(5.0)
    assert clip_gradients(parameters, max_norm=1.0) == pytest.approx(5.0)  # the norm before clipping
    assert clip_gradients(parameters, max_norm=None) == pytest.approx(1.0, rel=1e-5)


def test_open_clip_export_reloads_in_polyclip(tmp_path, pairs):
    result = train(make_config(tmp_path, pairs, "checkpoint.export_open_clip=true", "schedule.max_steps=1"))
    ours, _, tokenizer = polyclip.load(result.model_dir)
    again, _, _ = polyclip.load(result.exports["open_clip"])
    pixels, tokens = torch.randn(2, 3, 32, 32), tokenizer(["a red square", "something blue"])
    with torch.no_grad():
        torch.testing.assert_close(
            again.encode_image(pixels), ours.encode_image(pixels), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(again.encode_text(tokens), ours.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_training_streams_webdataset_shards(tmp_path):
    from test_train_fixtures import write_shards

    records = colour_pairs(tmp_path, 20, corrupt=1)
    shards = write_shards(tmp_path / "shards", records, tmp_path, per_shard=5)
    result = train(make_config(tmp_path, tmp_path / "shards", "schedule.max_steps=3"))
    assert result.steps == 3 and result.skipped_images >= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    assert len(shards) == 4
