"""ClipBERT domain module: parity with transformers and a hand-written reference, checkpoint layout,
tokenizer, sparse sampling, PyAV decoding, aggregation, retrieval metrics, QA, and a tiny training run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyclip.checkpoints.common import CheckpointError
from polyclip.domains.clipbert import (
    BertWordPieceTokenizer,
    ClipBert,
    ClipBertConfigError,
    ClipBertInputError,
    GridBackboneConfig,
    HeadConfig,
    QAError,
    SparseSamplingConfig,
    VideoDecodeError,
    VideoPreprocessConfig,
    VideoRetrievalConfig,
    aggregate_clip_logits,
    answer_multiple_choice,
    answer_open_ended,
    clip_consensus_loss,
    clip_frame_indices,
    init_cnn_from_detectron2,
    init_cnn_from_torchvision,
    init_text_from_bert,
    load_clipbert,
    load_reference_weights,
    load_video_clips,
    match_scores,
    preprocess_frames,
    probe_video,
    qa_accuracy,
    rank_score_matrix,
    retrieval_metrics,
    save_clipbert,
    score_videos,
    tiny_clipbert_config,
    to_reference_state_dict,
)
from polyclip.domains.clipbert.config import ClipBertConfig
from polyclip.eval.errors import EvalError

WORDS = [
    "a", "man", "is", "cook", "##ing", "in", "the", "kitchen", "red", "green", "blue", "white", "video", "of",
    "dog", "##s", "run", "##ning", "un", "##want", "##able", "cafe", "naive", "resume", "don", "t", "stop",
    "believ", "what", "color", "square", "中", "国",
]  # fmt: skip
PUNCTUATION = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PUNCTUATION, *digits, *letters]
    tokens += [f"##{c}" for c in letters + digits] + WORDS
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def vocab_size(vocab_file):
    return len(vocab_file.read_text(encoding="utf-8").splitlines())


def tiny_config(
    vocab_size: int, head: HeadConfig | None = None, dropout: float = 0.0, **vision
) -> ClipBertConfig:
    config = tiny_clipbert_config(head)
    text = dataclasses.replace(
        config.text, vocab_size=vocab_size, hidden_dropout=dropout, attention_dropout=dropout
    )
    return dataclasses.replace(config, text=text, vision=dataclasses.replace(config.vision, **vision))


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (LayerNorm and BN statistics included), so parity tests see every tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * scale
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:
                tensor.add_(noise)
    return model


# ---------------------------------------------------------------------------------------------------------
# tokenizer


TEXTS = [
    "A man is cooking in the kitchen.",
    "Café naïve RÉSUMÉ",
    "unwantable dogs running!!",
    "中国 video of a dog",
    "   multiple    spaces\tand\nnewlines ",
    "",
    "a " * 40,
    "[MASK] is red",
    "what\u0000 colo\ufffdr \u200b square",
    "don't stop-believing (1999)",
    "x" * 120 + " red",
    "😀 green ﬁ",
]


def test_tokenizer_matches_transformers_bert_tokenizer(vocab_file):
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    reference = legacy.BertTokenizerLegacy(str(vocab_file), do_lower_case=True)
    for max_length in (20, 40):
        ours = BertWordPieceTokenizer(vocab_file, max_length=max_length)(TEXTS)
        expected = reference(TEXTS, padding="max_length", truncation=True, max_length=max_length)
        assert ours.input_ids.tolist() == expected["input_ids"]
        assert ours.attention_mask.tolist() == expected["attention_mask"]
    assert ours.input_ids.shape == (len(TEXTS), 40)


def test_tokenizer_errors(tmp_path, vocab_file):
    with pytest.raises(ValueError, match="no WordPiece vocabulary"):
        BertWordPieceTokenizer(tmp_path / "missing.txt")
    bad = tmp_path / "vocab.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match="special tokens"):
        BertWordPieceTokenizer(bad)
    with pytest.raises(ValueError, match="sequence of str"):
        BertWordPieceTokenizer(vocab_file)([1, 2])


# ---------------------------------------------------------------------------------------------------------
# parity: text part against transformers' BertModel, CNN against transformers' ResNetModel


def test_text_part_matches_transformers_bert(tmp_path, vocab_file, vocab_size):
    transformers = pytest.importorskip("transformers")
    config = tiny_config(vocab_size)
    hf_config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=config.text.hidden_size,
        num_hidden_layers=config.text.num_layers,
        num_attention_heads=config.text.num_heads,
        intermediate_size=config.text.intermediate_size,
        max_position_embeddings=config.text.max_position_embeddings,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(0)
    bert = perturb(transformers.BertModel(hf_config)).eval()
    bert.save_pretrained(tmp_path / "bert")
    model = ClipBert(config).eval()
    report = init_text_from_bert(model, tmp_path / "bert")
    assert not [k for k in report.dropped if not k.endswith("position_ids")]

    texts = BertWordPieceTokenizer(vocab_file, max_length=16)(TEXTS[:6])
    with torch.no_grad():
        expected = bert(input_ids=texts.input_ids, attention_mask=texts.attention_mask)
        embeddings = model.encoder.text_embeddings(texts.input_ids)
        sequence, pooled = model.encoder(texts.input_ids, texts.attention_mask)
        torch.testing.assert_close(embeddings, bert.embeddings(input_ids=texts.input_ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(sequence, expected.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected.pooler_output, atol=1e-5, rtol=0)


def test_bert_folder_that_does_not_match_is_refused(tmp_path, vocab_size):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    transformers.BertModel(hf_config).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="hidden_size: folder 32 vs model 64"):
        init_text_from_bert(ClipBert(tiny_config(vocab_size)), tmp_path / "bert")


def hf_resnet_to_detectron2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ResNet keys -> detectron2 ``backbone.*`` keys (same architecture, other names)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("embedder.embedder.convolution", "stem.conv1")
        key = key.replace("embedder.embedder.normalization", "stem.conv1.norm")
        parts = key.split(".")
        if (
            parts[0] == "encoder"
        ):  # encoder.stages.S.layers.J.(shortcut|layer.K).(convolution|normalization)...
            stage, block = int(parts[2]) + 2, parts[4]
            if parts[5] == "shortcut":
                name, rest = "shortcut", parts[6:]
            else:
                name, rest = f"conv{int(parts[6]) + 1}", parts[7:]
            rest = ["norm", *rest[1:]] if rest[0] == "normalization" else rest[1:]
            key = ".".join([f"res{stage}", block, name, *rest])
        out[f"backbone.{key}"] = value
    return out


def hf_resnet(config: ClipBertConfig, stride_in_1x1: bool):
    transformers = pytest.importorskip("transformers")
    vision = config.vision
    hf_config = transformers.ResNetConfig(
        embedding_size=vision.stem_channels,
        hidden_sizes=[vision.res2_out_channels * 2**i for i in range(len(vision.stage_blocks))],
        depths=list(vision.stage_blocks),
        layer_type="bottleneck",
        downsample_in_bottleneck=stride_in_1x1,
    )
    torch.manual_seed(1)
    return perturb(transformers.ResNetModel(hf_config), scale=0.1, seed=1).eval()


def test_cnn_matches_transformers_resnet_in_detectron2_layout(tmp_path, vocab_size):
    config = tiny_config(vocab_size)
    resnet = hf_resnet(config, stride_in_1x1=True)
    checkpoint = {
        "model": {**hf_resnet_to_detectron2(resnet.state_dict()), "roi_heads.box.weight": torch.zeros(1)}
    }
    torch.save(checkpoint, tmp_path / "grid_feat.pth")
    model = ClipBert(config).eval()
    report = init_cnn_from_detectron2(model, tmp_path / "grid_feat.pth")
    assert report.dropped == ["roi_heads.box.weight"]
    # float64: the two implementations then agree to rounding (activations reach ~1e3 in float32)
    model, resnet = model.double(), resnet.double()
    pixels = torch.randn(2, 3, 96, 128, dtype=torch.float64) * 50
    with torch.no_grad():
        res5 = resnet(pixel_values=pixels).last_hidden_state  # (N, C5, 3, 4)
        torch.testing.assert_close(model.vision.backbone(pixels), res5, atol=1e-9, rtol=1e-9)
        # the grid encoder: 3x3 conv -> 2x2 max pool -> ReLU, channels last
        conv = model.vision.grid_encoder[0].weight
        expected = F.relu(F.max_pool2d(F.conv2d(res5, conv, padding=1), 2)).permute(0, 2, 3, 1)
        torch.testing.assert_close(model.vision(pixels), expected, atol=1e-9, rtol=1e-9)


def test_torchvision_weights_fold_their_input_normalisation(vocab_size):
    config = tiny_config(vocab_size, stride_in_1x1=False)
    resnet = hf_resnet(config, stride_in_1x1=False)
    detectron2 = hf_resnet_to_detectron2(resnet.state_dict())
    torchvision = {}
    for key, value in detectron2.items():  # detectron2 names -> torchvision names
        key = key.removeprefix("backbone.")
        key = key.replace("stem.conv1.norm.", "bn1.").replace("stem.conv1.", "conv1.")
        for stage in range(2, 6):
            key = key.replace(f"res{stage}.", f"layer{stage - 1}.")
        for k in (1, 2, 3):
            key = key.replace(f".conv{k}.norm.", f".bn{k}.")
        key = key.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
        torchvision[key] = value
    torchvision["fc.weight"] = torch.zeros(10, 128)
    model = ClipBert(config).double().eval()  # float64 throughout: the folded stem is not rounded
    init_cnn_from_torchvision(model, {k: v.double() for k, v in torchvision.items()})
    resnet = resnet.double()
    rgb = torch.rand(2, 3, 64, 64, dtype=torch.float64) * 255
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = resnet(pixel_values=(rgb / 255 - mean) / std).last_hidden_state
        ours = model.vision.backbone((rgb - 255 * mean).flip(1))  # BGR, mean-subtracted, std 1
    torch.testing.assert_close(ours, expected, atol=1e-9, rtol=1e-9)
    with pytest.raises(CheckpointError, match="stride_in_1x1=False"):
        init_cnn_from_torchvision(ClipBert(tiny_config(vocab_size)), torchvision)


# ---------------------------------------------------------------------------------------------------------
# the joint forward pass against a hand-written transcription of the reference's modeling.py


def reference_forward(sd, config, input_ids, text_mask, grid):
    """ClipBertBaseModel + heads from reference-named tensors: separate q/k/v, additive -10000 mask."""
    D, H, eps = config.text.hidden_size, config.text.num_heads, config.text.layer_norm_eps
    prefix = "transformer.bert."

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], eps)

    def dense(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    L = input_ids.shape[1]
    text = sd[prefix + "embeddings.word_embeddings.weight"][input_ids]
    text = (
        text
        + sd[prefix + "embeddings.position_embeddings.weight"][:L]
        + sd[prefix + "embeddings.token_type_embeddings.weight"][0]
    )
    text = ln(text, "embeddings.LayerNorm")
    B, T, h, w, _ = grid.shape
    pooled_grid = grid.mean(1)
    pooled_grid = pooled_grid + sd[prefix + "visual_embeddings.row_position_embeddings.weight"][:h].view(
        h, 1, D
    )
    pooled_grid = pooled_grid + sd[prefix + "visual_embeddings.col_position_embeddings.weight"][:w].view(
        1, w, D
    )
    visual = pooled_grid.view(B, h * w, D) + sd[prefix + "visual_embeddings.token_type_embeddings.weight"][0]
    visual = ln(visual, "visual_embeddings.LayerNorm")
    x = torch.cat([text, visual], dim=1)
    mask = torch.cat([text_mask, text_mask.new_ones(B, h * w)], dim=1).float()
    additive = (1.0 - mask)[:, None, None, :] * -10000.0
    for i in range(config.text.num_layers):
        layer = f"{prefix}encoder.layer.{i}."

        def heads(t):
            return t.view(B, -1, H, D // H).transpose(1, 2)

        q, k, v = (heads(dense(x, layer + f"attention.self.{n}")) for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H) + additive, dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(B, -1, D)
        attention = ln(
            dense(context, layer + "attention.output.dense") + x,
            f"encoder.layer.{i}.attention.output.LayerNorm",
        )
        inner = F.gelu(dense(attention, layer + "intermediate.dense"))
        x = ln(dense(inner, layer + "output.dense") + attention, f"encoder.layer.{i}.output.LayerNorm")
    pooled = torch.tanh(dense(x[:, 0], prefix + "pooler.dense"))
    if "transformer.cls.seq_relationship.weight" in sd:
        logits = dense(pooled, "transformer.cls.seq_relationship")
    else:
        logits = dense(F.relu(dense(pooled, "transformer.classifier.0")), "transformer.classifier.2")
    return x, pooled, logits


@pytest.mark.parametrize("head", [HeadConfig(), HeadConfig(kind="mlp", num_outputs=7)], ids=["itm", "mlp"])
def test_joint_forward_matches_reference_transcription(vocab_file, vocab_size, head):
    config = tiny_config(vocab_size, head)
    torch.manual_seed(2)
    model = perturb(ClipBert(config), seed=2).eval()
    sd = to_reference_state_dict(model)
    texts = BertWordPieceTokenizer(vocab_file, max_length=12)(
        ["a man is cooking", "red", "the dog is running fast"]
    )
    pixels = torch.randn(3, 2, 3, 128, 192) * 40  # 3 clips of 2 frames -> 2x3 grids
    with torch.no_grad():
        output = model(pixels, texts.input_ids, texts.attention_mask)
        grid = model.encode_frames(pixels)
        sequence, pooled, logits = reference_forward(sd, config, texts.input_ids, texts.attention_mask, grid)
    assert grid.shape == (3, 2, 2, 3, config.text.hidden_size)
    torch.testing.assert_close(output.sequence, sequence, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.pooled, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.logits, logits, atol=1e-5, rtol=0)


def test_texts_per_clip_shares_the_cnn(vocab_file, vocab_size):
    model = ClipBert(tiny_config(vocab_size)).eval()
    texts = BertWordPieceTokenizer(vocab_file, max_length=8)(["red", "green", "blue"])
    pixels = torch.randn(2, 1, 3, 64, 64)
    with torch.no_grad():
        grouped = model(pixels, texts.input_ids, texts.attention_mask, texts_per_clip=[2, 1]).logits
        paired = model(pixels[[0, 0, 1]], texts.input_ids, texts.attention_mask).logits
    torch.testing.assert_close(grouped, paired)
    with pytest.raises(ClipBertInputError, match="texts_per_clip"):
        model(pixels, texts.input_ids, texts.attention_mask, texts_per_clip=[1, 1])
    with pytest.raises(ClipBertInputError, match="pass texts_per_clip"):
        model(pixels, texts.input_ids, texts.attention_mask)
    with pytest.raises(ClipBertInputError, match=r"\(B, T, 3, H, W\)"):
        model(pixels[0], texts.input_ids, texts.attention_mask)


def test_config_validation_and_round_trip():
    config = tiny_clipbert_config(HeadConfig(kind="mlp", num_outputs=5))
    assert ClipBertConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ClipBertConfigError, match="unknown"):
        ClipBertConfig.from_dict({**config.to_dict(), "extra": 1})
    with pytest.raises(ClipBertConfigError, match="2-way"):
        ClipBertConfig(head=HeadConfig(kind="itm", num_outputs=3))
    with pytest.raises(ClipBertConfigError, match="width"):
        ClipBertConfig(vision=GridBackboneConfig(out_channels=512))


# ---------------------------------------------------------------------------------------------------------
# checkpoints in the reference layout


def reference_extras(config: ClipBertConfig) -> dict[str, torch.Tensor]:
    """Tensors of a real reference checkpoint that the forward pass never reads."""
    D = config.text.hidden_size
    return {
        "cnn.feature.pixel_mean": torch.zeros(3, 1, 1),
        "cnn.feature.pixel_std": torch.ones(3, 1, 1),
        "cnn.feature.proposal_generator.rpn_head.conv.weight": torch.zeros(4, 4, 3, 3),
        "cnn.feature.roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 4),
        "transformer.bert.visual_embeddings.position_embeddings.weight": torch.zeros(8, D),
        "transformer.cls.predictions.bias": torch.zeros(config.text.vocab_size),
        "transformer.cls.predictions.decoder.weight": torch.zeros(config.text.vocab_size, D),
        "transformer.cls.predictions.transform.dense.weight": torch.zeros(D, D),
    }


def test_reference_checkpoint_round_trip(tmp_path, vocab_file, vocab_size):
    config = tiny_config(vocab_size)
    torch.manual_seed(3)
    model = perturb(ClipBert(config), seed=3).eval()
    state_dict = {**to_reference_state_dict(model), **reference_extras(config)}
    assert "transformer.bert.encoder.layer.1.attention.self.query.weight" in state_dict
    assert "cnn.feature.backbone.res2.0.conv1.norm.running_var" in state_dict
    assert "cnn.grid_encoder.0.weight" in state_dict
    torch.save(state_dict, tmp_path / "clipbert_image_text_pretrained.pt")

    loaded, report = load_clipbert(tmp_path / "clipbert_image_text_pretrained.pt", config)
    assert sorted(report.dropped) == sorted(reference_extras(config))
    texts = BertWordPieceTokenizer(vocab_file, max_length=10)(["a red square", "green"])
    pixels = torch.randn(2, 2, 3, 128, 128) * 30
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixels, texts.input_ids, texts.attention_mask).logits,
            model(pixels, texts.input_ids, texts.attention_mask).logits,
            atol=0,
            rtol=0,
        )
    # the polyclip folder format round-trips too
    save_clipbert(loaded, tmp_path / "folder", vocab_file)
    again, _ = load_clipbert(tmp_path / "folder")
    assert (tmp_path / "folder" / "vocab.txt").is_file()
    for key, value in loaded.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_half_precision_reference_checkpoint_loads_in_float32(vocab_size):
    # apex O2 (the reference's fp16 training) saves float16 weights
    config = tiny_config(vocab_size)
    source = ClipBert(config)
    half = {k: v.half() if v.is_floating_point() else v for k, v in to_reference_state_dict(source).items()}
    model = ClipBert(config)
    report = load_reference_weights(model, half)
    assert report.source_dtypes == ["float16"]
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}
    expected = source.state_dict()["encoder.layers.0.attn.qkv.weight"].half().float()
    assert torch.equal(model.state_dict()["encoder.layers.0.attn.qkv.weight"], expected)


def test_reference_checkpoint_strict_errors(vocab_size):
    config = tiny_config(vocab_size)
    state_dict = to_reference_state_dict(ClipBert(config))
    missing = dict(state_dict)
    del missing["transformer.bert.encoder.layer.0.attention.self.key.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): encoder.layers.0.attn.qkv.bias"):
        load_reference_weights(ClipBert(config), missing)
    extra = {**state_dict, "transformer.bert.encoder.layer.9.output.dense.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): encoder.layers.9.mlp.fc2.weight"):
        load_reference_weights(ClipBert(config), extra)
    wrong = {**state_dict, "cnn.grid_encoder.0.weight": torch.zeros(64, 64, 3, 3)}
    with pytest.raises(CheckpointError, match=r"vision.grid_encoder.0.weight: checkpoint \(64, 64, 3, 3\)"):
        load_reference_weights(ClipBert(config), wrong)
    # a QA model from the pre-trained checkpoint: the ITM head goes, a fresh MLP head comes
    qa = ClipBert(tiny_config(vocab_size, HeadConfig(kind="mlp", num_outputs=9)))
    with pytest.raises(CheckpointError, match="head.fc1.weight"):
        load_reference_weights(qa, state_dict)
    report = load_reference_weights(qa, state_dict, new_head=True)
    assert report.dropped == [
        "transformer.cls.seq_relationship.bias",
        "transformer.cls.seq_relationship.weight",
    ]
    assert sorted(report.initialised) == [
        "head.fc1.bias",
        "head.fc1.weight",
        "head.fc2.bias",
        "head.fc2.weight",
    ]


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_clipbert(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_clipbert(tmp_path / "junk.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="clipbert_config.json is missing"):
        load_clipbert(tmp_path / "folder")


# ---------------------------------------------------------------------------------------------------------
# sparse sampling


def test_uniform_sampling_known_answer():
    # 100 frames at 30 fps; clips of 2 frames at 2 fps span 30 source frames; delta = 70
    indices = clip_frame_indices(100, 30.0, SparseSamplingConfig(num_clips=4, num_frames=2, target_fps=2.0))
    starts = [70 * i / 4 for i in range(4)]  # 0, 17.5, 35, 52.5
    expected = [[int(s), int(s + 29)] for s in starts]
    assert indices.tolist() == expected
    assert indices.dtype == np.int64


def test_uniform_sampling_spacing_and_bounds():
    config = SparseSamplingConfig(num_clips=16, num_frames=3, target_fps=1.0)
    indices = clip_frame_indices(901, 25.0, config)
    assert indices.shape == (16, 3)
    assert (indices >= 0).all() and (indices < 901).all()
    gaps = np.diff(indices[:, 0])
    assert gaps.max() - gaps.min() <= 1  # evenly spaced starts
    assert ((indices[:, 2] - indices[:, 0]) == 74).all()  # 3 frames at 1 fps = 75 source frames


def test_random_sampling_is_seeded_and_inside_the_video():
    config = SparseSamplingConfig(num_clips=8, num_frames=2, target_fps=2.0)
    a = clip_frame_indices(300, 30.0, config, mode="random", rng=7)
    b = clip_frame_indices(300, 30.0, config, mode="random", rng=np.random.default_rng(7))
    c = clip_frame_indices(300, 30.0, config, mode="random", rng=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (8, 2) and (a >= 0).all() and (a < 300).all()
    assert ((a[:, 1] - a[:, 0]) == 29).all()
    many = clip_frame_indices(300, 30.0, SparseSamplingConfig(num_clips=400), mode="random", rng=0)
    assert many[:, 0].min() < 20 and many[:, 0].max() > 250  # starts cover [0, delta]


def test_short_video_repeats_frames():
    indices = clip_frame_indices(3, 30.0, SparseSamplingConfig(num_clips=2, num_frames=4, target_fps=2.0))
    assert indices.tolist() == [[0, 2, 2, 2], [0, 2, 2, 2]]
    with pytest.raises(ValueError, match="sampling mode"):
        clip_frame_indices(10, 30.0, SparseSamplingConfig(), mode="dense")
    with pytest.raises(VideoDecodeError):
        clip_frame_indices(0, 30.0, SparseSamplingConfig())


# ---------------------------------------------------------------------------------------------------------
# decoding and preprocessing


def gray_level(index: int) -> int:
    return 10 + 12 * index


def write_video(path, num_frames=20, height=48, width=64, fps=10, codec="ffv1", pix_fmt="yuv444p"):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for index in range(num_frames):
            image = np.full((height, width, 3), gray_level(index), dtype=np.uint8)
            image[4:12, 4:12] = (255, 0, 0)  # a red square top-left
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize(
    ("name", "codec", "pix_fmt"), [("clip.mkv", "ffv1", "yuv444p"), ("clip.mp4", "mpeg4", "yuv420p")]
)
def test_decode_sampled_frames_from_a_real_video(tmp_path, name, codec, pix_fmt):
    path = write_video(tmp_path / name, codec=codec, pix_fmt=pix_fmt)
    info = probe_video(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (20, 10.0, 64, 48)
    sampling = SparseSamplingConfig(num_clips=3, num_frames=2, target_fps=2.0)  # clips of 10 source frames
    preprocess = VideoPreprocessConfig(max_size=128)
    clips = load_video_clips(path, sampling, preprocess)
    assert clips.frame_indices.tolist() == [[0, 9], [3, 12], [6, 15]]
    assert clips.pixels.shape == (3, 2, 3, 128, 128)
    # 64x48 -> 128x96, padded below; the gray level identifies the decoded frame
    mean_bgr = torch.tensor(preprocess.mean).flip(0)
    for clip in range(3):
        for frame in range(2):
            pixels = clips.pixels[clip, frame]
            level = gray_level(int(clips.frame_indices[clip, frame]))
            content = pixels[:, 40:90, 40:120] + mean_bgr.view(3, 1, 1)
            assert (content - level).abs().max() < (4 if codec == "ffv1" else 8)
            padding = pixels[:, 96:, :]
            torch.testing.assert_close(padding, (-mean_bgr).view(3, 1, 1).expand_as(padding))
    red = clips.pixels[0, 0, :, 10:20, 10:20].mean(dim=(1, 2)) + mean_bgr  # BGR order: red is channel 2
    assert red[2] > 220 and red[0] < 40


def test_corrupt_and_missing_videos(tmp_path):
    pytest.importorskip("av")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        load_video_clips(broken)
    empty = tmp_path / "empty.mkv"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError):
        probe_video(empty)
    with pytest.raises(FileNotFoundError):
        load_video_clips(tmp_path / "absent.mp4")


def test_frame_folder_in_natural_order(tmp_path):
    from PIL import Image

    for index in range(12):  # frame2.png must come before frame10.png
        Image.new("RGB", (40, 30), (gray_level(index),) * 3).save(tmp_path / f"frame{index}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    sampling = SparseSamplingConfig(num_clips=2, num_frames=2, target_fps=1.0)
    clips = load_video_clips(tmp_path, sampling, VideoPreprocessConfig(max_size=64), frames_fps=2.0)
    assert clips.frame_indices.tolist() == [[0, 3], [4, 7]]
    for (clip, frame), index in np.ndenumerate(clips.frame_indices):
        value = clips.pixels[clip, frame, 2, 0, 0] + 123.675  # R channel (last in BGR) at the top-left
        assert abs(float(value) - gray_level(int(index))) < 1e-3
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoDecodeError, match="no image frames"):
        load_video_clips(tmp_path / "empty")


def test_preprocess_known_answer():
    frames = np.zeros((1, 40, 20, 3), dtype=np.uint8)
    frames[..., 0] = 200  # pure red, portrait
    pixels = preprocess_frames(frames, VideoPreprocessConfig(max_size=64))
    assert pixels.shape == (1, 3, 64, 64)
    # resized to 64x32 (longer side 64), right half padded with zeros before the mean is removed
    torch.testing.assert_close(
        pixels[0, :, :, :32], torch.tensor([-103.53, -116.28, 200 - 123.675]).view(3, 1, 1).expand(3, 64, 32)
    )
    torch.testing.assert_close(
        pixels[0, :, :, 32:], torch.tensor([-103.53, -116.28, -123.675]).view(3, 1, 1).expand(3, 64, 32)
    )


# ---------------------------------------------------------------------------------------------------------
# aggregation and retrieval metrics


def test_aggregation_known_answers():
    logits = torch.tensor([[[1.0, 2.0]], [[3.0, 0.0]]])  # 2 clips, 1 pair, 2 classes
    assert aggregate_clip_logits(logits, "mean").tolist() == [[2.0, 1.0]]
    assert aggregate_clip_logits(logits, "max").tolist() == [[3.0, 2.0]]
    lse = aggregate_clip_logits(logits, "lse")
    torch.testing.assert_close(lse, torch.tensor([[math.log(math.e + math.e**3), math.log(math.e**2 + 1)]]))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_clip_logits(logits, "median")
    torch.testing.assert_close(match_scores(torch.tensor([[0.0, math.log(3.0)]])), torch.tensor([0.75]))
    torch.testing.assert_close(match_scores(torch.tensor([[0.0]])), torch.tensor([0.5]))
    # the log-sum-exp loss: -log(sum_c exp(l_cy) / sum_ck exp(l_ck))
    loss = clip_consensus_loss(logits, torch.tensor([1]), "lse")
    expected = -math.log((math.e**2 + 1) / (math.e + math.e**2 + math.e**3 + 1))
    torch.testing.assert_close(loss, torch.tensor([expected]))
    # with one clip every aggregation is plain cross-entropy
    single = logits[:1]
    for method in ("mean", "max", "lse"):
        torch.testing.assert_close(
            clip_consensus_loss(single, torch.tensor([0]), method),
            F.cross_entropy(single[0], torch.tensor([0]), reduction="none"),
        )


def test_retrieval_metrics_known_answer():
    # 4 texts x 3 videos; text i belongs to video [0, 1, 2, 2][i]
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # video 0 first: rank 1
            [0.8, 0.3, 0.5],  # video 1 third: rank 3
            [0.1, 0.6, 0.6],  # tie with video 1, which has the lower index: rank 2
            [0.0, 0.1, 0.7],  # rank 1
        ]
    )
    metrics = retrieval_metrics(scores, [0, 1, 2, 2], recall_ks=(1, 2))
    t2v = metrics.text_to_video
    assert t2v.ranks.tolist() == [1, 3, 2, 1]
    assert t2v.recall_at == {1: 0.5, 2: 0.75}
    assert t2v.median_rank == 1.5
    # video 0: its text 0 is best; video 1: text 2 (0.6) beats its text 1 (0.3); video 2: its text 3 (0.7)
    v2t = metrics.video_to_text
    assert v2t.ranks.tolist() == [1, 2, 1]
    summary = metrics.summary()
    assert summary["t2v_R@1"] == 0.5 and summary["v2t_median_rank"] == 1.0 and summary["v2t_R@2"] == 1.0
    ranking = rank_score_matrix(scores, torch.tensor([[0], [1], [2], [2]]), top_k=2)
    assert ranking.top_indices.tolist() == [[0, 2], [0, 2], [1, 2], [2, 1]]
    with pytest.raises(EvalError):
        retrieval_metrics(scores, [0, 1, 3, 2])
    with pytest.raises(EvalError, match="NaN"):
        retrieval_metrics(torch.full((2, 2), float("nan")), [0, 1])


def test_distractor_videos_are_skipped_for_video_to_text():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.9]])  # video 2 has no text
    metrics = retrieval_metrics(scores, [0, 1], recall_ks=(1,))
    assert metrics.text_to_video.ranks.tolist() == [1, 2]
    assert metrics.video_to_text.ranks.tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------------
# retrieval and QA pipelines on tiny models


def test_score_videos_equals_per_clip_forward_passes(vocab_file, vocab_size):
    torch.manual_seed(4)
    model = perturb(ClipBert(tiny_config(vocab_size)), seed=4).eval()
    tokenizer = BertWordPieceTokenizer(vocab_file, max_length=8)
    texts = tokenizer(["red", "a green square", "blue video", "white dog"])
    videos = [torch.randn(2, 2, 3, 64, 64) * 40 for _ in range(2)]
    with torch.no_grad():  # (videos, clips, texts, 2) logits, one forward pass per clip
        clip_logits = [
            torch.stack(
                [model(v[c : c + 1], texts.input_ids, texts.attention_mask, [4]).logits for c in range(2)]
            )
            for v in videos
        ]
    for method in ("mean", "max", "lse"):
        config = VideoRetrievalConfig(aggregation=method, pair_batch_size=3, frame_batch_size=3)
        scores = score_videos(model, iter(videos), texts, config)
        assert scores.shape == (4, 2)
        for v in range(2):
            expected = match_scores(aggregate_clip_logits(clip_logits[v], method))
            torch.testing.assert_close(scores[:, v], expected, atol=1e-5, rtol=1e-5)
    # lse was the last method: bfloat16 autocast stays close to it
    bf16 = score_videos(model, videos, texts, VideoRetrievalConfig(pair_batch_size=5, bf16=True))
    torch.testing.assert_close(bf16, scores, atol=0.05, rtol=0)


def test_video_qa(vocab_file, vocab_size, tmp_path):
    from polyclip.domains.clipbert import load_answer_vocabulary

    tokenizer = BertWordPieceTokenizer(vocab_file, max_length=12)
    pixels = torch.randn(2, 1, 3, 64, 64) * 40
    (tmp_path / "ans2label.json").write_text('{"red": 1, "blue": 0, "green": 2}')
    answers = load_answer_vocabulary(tmp_path / "ans2label.json")
    assert answers == ["blue", "red", "green"]
    torch.manual_seed(5)
    open_model = perturb(
        ClipBert(tiny_config(vocab_size, HeadConfig(kind="mlp", num_outputs=3))), seed=5
    ).eval()
    prediction = answer_open_ended(
        open_model, tokenizer, pixels, ["what color is the square", "what is the man"], answers
    )
    assert prediction.logits.shape == (2, 3)
    assert prediction.answers == [answers[i] for i in prediction.logits.argmax(1).tolist()]
    with pytest.raises(QAError, match="4 answers"):
        answer_open_ended(open_model, tokenizer, pixels, ["q"], ["a", "b", "c", "d"])

    choice_model = perturb(
        ClipBert(tiny_config(vocab_size, HeadConfig(kind="mlp", num_outputs=1))), seed=6
    ).eval()
    options = [["red", "blue", "green"], ["cook", "run", "dog"]]
    prediction = answer_multiple_choice(
        choice_model, tokenizer, pixels, ["what color", "what is the man doing"], options
    )
    assert prediction.logits.shape == (2, 3)
    with torch.no_grad():
        texts = tokenizer(
            ["what is the man doing cook", "what is the man doing run", "what is the man doing dog"]
        )
        per_clip = [
            choice_model(pixels[c : c + 1], texts.input_ids, texts.attention_mask, [3]).logits[:, 0]
            for c in range(2)
        ]
    torch.testing.assert_close(
        prediction.logits[1], torch.logsumexp(torch.stack(per_clip), 0), atol=1e-5, rtol=1e-5
    )
    assert qa_accuracy(prediction.predicted, prediction.predicted) == 1.0
    with pytest.raises(QAError, match="same, non-zero number"):
        answer_multiple_choice(choice_model, tokenizer, pixels, ["a", "b"], [["x"], ["y", "z"]])


# ---------------------------------------------------------------------------------------------------------
# a tiny model learns to match colour words to coloured videos


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (235, 235, 235)}


def synthetic_video(colour, generator, clips=2, frames=1, size=64) -> torch.Tensor:
    base = np.array(colour, dtype=np.float32)
    noise = generator.normal(0, 20, size=(clips * frames, size, size, 3))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    pixels = preprocess_frames(images, VideoPreprocessConfig(max_size=size))
    return pixels.view(clips, frames, 3, size, size)


@pytest.mark.slow
def test_tiny_model_learns_to_rank_the_matching_video_first(vocab_file, vocab_size):
    """ITM training with every (video, text) pair, log-sum-exp over 2 clips; then retrieval must be exact."""
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    model = ClipBert(tiny_config(vocab_size, dropout=0.0))
    tokenizer = BertWordPieceTokenizer(vocab_file, max_length=4)
    names = list(COLOURS)
    texts = tokenizer(names)
    pair_ids, pair_masks = texts.input_ids.repeat(4, 1), texts.attention_mask.repeat(4, 1)  # video-major
    labels = torch.eye(4, dtype=torch.int64).flatten()  # 4 positives, 12 negatives
    weights = torch.where(labels == 1, 3.0, 1.0)  # balance them
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(100):
        model.train()
        videos = torch.stack([synthetic_video(COLOURS[n], generator) for n in names])  # (4, C, T, 3, S, S)
        clip_logits = torch.stack(
            [model(videos[:, c], pair_ids, pair_masks, texts_per_clip=[4] * 4).logits for c in range(2)]
        )  # (C, 16, 2)
        loss = (clip_consensus_loss(clip_logits, labels, "lse") * weights).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scores = score_videos(model, [synthetic_video(COLOURS[n], generator) for n in names], texts)
    metrics = retrieval_metrics(scores, range(4))
    assert metrics.text_to_video.recall_at[1] == 1.0, scores
    assert metrics.video_to_text.recall_at[1] == 1.0, scores


# ---------------------------------------------------------------------------------------------------------
# command line


@pytest.fixture
def video_cli(tmp_path, vocab_file, vocab_size):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from polyclip.cli.video import register

    app = typer.Typer()
    register(app)
    torch.manual_seed(7)
    save_clipbert(ClipBert(tiny_config(vocab_size)), tmp_path / "model", vocab_file)
    choice = ClipBert(tiny_config(vocab_size, HeadConfig(kind="mlp", num_outputs=1)))
    save_clipbert(choice, tmp_path / "choice", vocab_file)
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "first.mkv", num_frames=12)
    write_video(videos / "second.mp4", num_frames=8, codec="mpeg4", pix_fmt="yuv420p")
    from PIL import Image

    (videos / "third").mkdir()
    for index in range(5):
        Image.new("RGB", (32, 32), (200, 10 * index, 0)).save(videos / "third" / f"{index:03d}.jpg")
    (videos / "readme.txt").write_text("not a video")
    return CliRunner(), app, tmp_path


def test_cli_retrieve_with_ground_truth(video_cli):
    runner, app, root = video_cli
    queries = root / "queries.jsonl"
    queries.write_text('{"text": "a red square", "video": "first"}\n{"text": "green", "video": "third"}\n')
    args = [
        "video",
        "retrieve",
        "-c",
        str(root / "model"),
        "--videos",
        str(root / "videos"),
        "--queries",
        str(queries),
    ]
    args += [
        "--clips",
        "2",
        "--frames",
        "2",
        "--size",
        "64",
        "--top-k",
        "2",
        "--device",
        "cpu",
        "-o",
        str(root / "r.json"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((root / "r.json").read_text())
    assert report["videos"] == ["first", "second", "third"]
    assert len(report["scores"]) == 2 and len(report["scores"][0]) == 3
    assert [len(q["top"]) for q in report["queries"]] == [2, 2]
    assert set(report["metrics"]) >= {"t2v_R@1", "t2v_median_rank", "v2t_R@10"}
    bad = root / "bad.jsonl"
    bad.write_text('{"text": "x", "video": "nowhere"}\n')
    result = runner.invoke(app, [*args[:6], "--queries", str(bad), "--size", "64", "--device", "cpu"])
    assert isinstance(result.exception, ValueError) and "nowhere" in str(result.exception)


def test_cli_multiple_choice_qa_and_sample(video_cli):
    runner, app, root = video_cli
    questions = root / "questions.jsonl"
    questions.write_text(
        '{"question": "what color", "options": ["red", "blue"], "answer": 0}\n'
        '{"question": "what is it", "options": ["dog", "video"], "answer": "video"}\n'
    )
    args = ["video", "qa", "-c", str(root / "choice"), "--video", str(root / "videos" / "first.mkv")]
    args += [
        "--questions",
        str(questions),
        "--clips",
        "2",
        "--size",
        "64",
        "--device",
        "cpu",
        "-o",
        str(root / "q.json"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((root / "q.json").read_text())
    assert [
        q["answer"] in opts for q, opts in zip(report["questions"], (["red", "blue"], ["dog", "video"]))
    ] == [True, True]
    assert 0.0 <= report["accuracy"] <= 1.0
    result = runner.invoke(
        app, ["video", "sample", str(root / "videos" / "first.mkv"), "--clips", "3", "--fps", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "12 frames at 10 fps" in result.output and "clip 2: frames [5, 8]" in result.output


def test_tasks_api_ranks_videos_and_answers_questions(video_cli):
    """What the CLI prints comes from the API: `retrieve_videos` and `plan_questions` + `answer_questions`."""
    from polyclip.domains.clipbert import SparseSamplingConfig, VideoPreprocessConfig
    from polyclip.domains.clipbert.data import VideoDataError
    from polyclip.domains.clipbert.tasks import (
        answer_questions,
        load_task_model,
        plan_questions,
        retrieve_videos,
    )

    _, _, root = video_cli
    sampling, preprocess = SparseSamplingConfig(num_clips=2, num_frames=2), VideoPreprocessConfig(max_size=64)
    model, tokenizer, _ = load_task_model(root / "model", None, "pretrained", device="cpu")
    queries = root / "queries.jsonl"
    queries.write_text('{"text": "a red square", "video": "first"}\n{"text": "green", "video": "third"}\n')
    ranking = retrieve_videos(model, tokenizer, root / "videos", queries, sampling, preprocess, top_k=3)
    assert ranking.videos == ["first", "second", "third"] and ranking.scores.shape == (2, 3)
    for row, top in enumerate(ranking.top):  # best first, and the scores of the matrix
        assert [v for v, _ in top] == [
            ranking.videos[i] for i in ranking.scores[row].argsort(descending=True)
        ]
    assert ranking.metrics is not None and 0 <= ranking.metrics["t2v_R@1"] <= 1
    assert ranking.to_dict()["queries"][0]["query"] == "a red square"

    questions = root / "questions.jsonl"
    questions.write_text(
        '{"question": "what color", "video": "first", "options": ["red", "blue"], "answer": 1}\n'
        '{"question": "what is it", "video": "third", "options": ["dog", "video"], "answer": "video"}\n'
        '{"question": "and here", "video": "first", "options": ["a", "b"], "answer": "a"}\n'
    )
    plan = plan_questions(questions, videos=root / "videos")
    assert plan.task == "multiple_choice" and [p.name for p in plan.targets] == [
        "first.mkv",
        "third",
        "first.mkv",
    ]
    choice, choice_tokenizer, _ = load_task_model(root / "choice", None, plan.task, device="cpu")
    result = answer_questions(choice, choice_tokenizer, plan, sampling, preprocess)
    assert result.truth == ["blue", "video", "a"]
    assert result.accuracy == sum(a == t for a, t in zip(result.answers, result.truth)) / 3
    assert all(opts[i] == a for opts, i, a in zip(plan.questions.options, result.options, result.answers))
    with pytest.raises(ValueError, match="exactly one"):
        plan_questions(questions)
    plain = root / "plain.txt"
    plain.write_text("what is it\n")
    with pytest.raises(VideoDataError, match="name their 'video'"):
        plan_questions(plain, videos=root / "videos")
    with pytest.raises(ValueError, match="answer vocabulary"):
        plan_questions(plain, video=root / "videos" / "first.mkv")


@pytest.mark.slow
def test_full_size_forward_matches_reference_transcription(vocab_file):
    """The released architecture (ResNet-50 + BERT-base, 448x448 frames -> 7x7 grids), fp32, TF32 off."""
    from polyclip.domains.clipbert import clipbert_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config = clipbert_config("pretrained")
    config.text.hidden_dropout = config.text.attention_dropout = 0.0
    torch.manual_seed(8)
    model = perturb(ClipBert(config), scale=0.02, seed=8).to(device).eval()
    texts = BertWordPieceTokenizer(vocab_file, max_length=20)(["a man is cooking in the kitchen", "red"])
    pixels = torch.randn(2, 2, 3, 448, 448, device=device) * 60
    ids, mask = texts.input_ids.to(device), texts.attention_mask.to(device)
    with torch.no_grad():
        output = model(pixels, ids, mask)
        grid = model.encode_frames(pixels)
        sd = to_reference_state_dict(model)
        _, pooled, logits = reference_forward(sd, config, ids, mask, grid)
    assert grid.shape == (2, 2, 7, 7, 768) and output.sequence.shape == (2, 20 + 49, 768)
    torch.testing.assert_close(output.pooled, pooled, atol=1e-4, rtol=0)
    torch.testing.assert_close(output.logits, logits, atol=1e-4, rtol=0)
