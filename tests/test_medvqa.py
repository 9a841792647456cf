"""Medical VQA (PubMedCLIP's MEVF + BAN): tokenizer, word vectors, tf-idf, answers, question files,
bilinear attention against a hand-written computation, autoencoder, model shapes and gradients,
loss, schedule, metric, PubMedCLIP checkpoint loading, a tiny training run that must learn, the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polyclip
from polyclip.domains.medvqa import (
    AnswerVocabulary,
    MedVQA,
    MedVQAConfig,
    MedVQAConfigError,
    MedVQADataError,
    MedVQADataset,
    MedVQAModel,
    QuestionDictionary,
    TrainConfig,
    WordVectorError,
    accuracy_by_type,
    answer_scores,
    evaluate,
    learning_rate,
    load_records,
    load_word_vectors,
    medvqa_loss,
    score_answers,
    tfidf_matrix,
    tokenize,
    train,
)
from polyclip.domains.medvqa.autoencoder import ConvAutoencoder, load_autoencoder_weights
from polyclip.domains.medvqa.layers import BilinearAttentionNetwork, WeightNormFC, WeightNormLinear
from polyclip.models import DualEncoderConfig, TextConfig, VisionConfig
from polyclip.transforms import build_preprocess

# A CLIP small enough to train in seconds; heads of 64 dims so OpenAI's shape rules read it back.
TINY_CLIP = DualEncoderConfig(
    embed_dim=32,
    vision=VisionConfig(
        image_size=32, patch_size=8, width=64, layers=1, heads=1, mlp_dim=256, act="quick_gelu"
    ),
    text=TextConfig(context_length=16, width=64, layers=1, heads=1, mlp_dim=256, act="quick_gelu"),
)
# random word embeddings (no GloVe), so without the tf-idf copy that main.py builds from GloVe by default
TINY_OPTIONS = dict(
    word_dim=16, hidden_dim=32, autoencoder_size=16, autoencoder_dim=16, tfidf_embedding=False
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matrices: thread start-up costs more than it saves on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# synthetic data: a bright square on the left or right of a dark grey image


def spot_image(side: str, rng: random.Random) -> Image.Image:
    pixels = np.full((32, 32), 20, dtype=np.uint8)
    y = rng.randint(2, 24)
    x = rng.randint(2, 10) if side == "left" else rng.randint(18, 26)
    pixels[y : y + 5, x : x + 5] = 240
    noise = np.asarray([rng.randint(0, 20) for _ in range(32 * 32)], dtype=np.uint8).reshape(32, 32)
    return Image.fromarray(np.clip(pixels.astype(int) + noise, 0, 255).astype(np.uint8), "L")


def spot_records(count: int, prefix: str, folder: Path, seed: int) -> list[dict]:
    """Three questions per image whose answers depend on where the spot is (and, closed, on the question)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        side = "left" if i % 2 == 0 else "right"
        name = f"{prefix}{i}.png"
        spot_image(side, rng).save(folder / name)
        common = dict(image_name=name, question_type="POS")
        records += [
            dict(common, qid=f"{prefix}{i}a", question="Is the bright spot on the left?",
                 answer="yes" if side == "left" else "no", answer_type="CLOSED"),
            dict(common, qid=f"{prefix}{i}b", question="Is the bright spot on the right?",
                 answer="yes" if side == "right" else "no", answer_type="CLOSED"),
            dict(common, qid=f"{prefix}{i}c", question="Where is the bright spot?", answer=side, answer_type="OPEN"),
        ]  # fmt: skip
    return records


@pytest.fixture(scope="module")
def spot_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spots")
    (root / "train.json").write_text(json.dumps(spot_records(64, "tr", root / "images", 0)))
    (root / "test.json").write_text(json.dumps(spot_records(16, "te", root / "images", 1)))
    return root


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    return polyclip.create_model(TINY_CLIP), build_preprocess({"image_size": 32})


# ---------------------------------------------------------------------------------------------------------
# questions and answers


def test_tokenize_follows_the_reference_rules():
    assert tokenize("Is this an X ray of the patient's chest? -yes/no") == [
        "is", "this", "an", "x-ray", "of", "the", "patient", "'s", "chest",
    ]  # fmt: skip
    assert tokenize("Where is the mass, exactly...? - open") == ["where", "is", "the", "mass", "exactly"]
    assert tokenize("  Size   of the 2.5 cm lesion?") == ["size", "of", "the", "25", "cm", "lesion"]


def test_dictionary_pads_cuts_and_maps_unknown_words():
    dictionary = QuestionDictionary.build(["Is there a mass?", "Where is the mass?"])
    assert dictionary.words == ["is", "there", "a", "mass", "where", "the", "<unk>"]
    assert dictionary.padding_id == 7 and dictionary.unknown_id == 6
    ids = dictionary.encode("Is there a tumour?", 6)
    assert ids.tolist() == [0, 1, 2, 6, 7, 7]
    assert dictionary.encode("is is is is is is is", 3).tolist() == [0, 0, 0]
    assert dictionary.encode_batch(["where", "the mass"], 2).tolist() == [[4, 7], [5, 3]]
    assert QuestionDictionary.from_json(dictionary.to_json()).words == dictionary.words


def test_read_dictionary(tmp_path):
    from polyclip.domains.medvqa.text import read_dictionary

    (tmp_path / "words.json").write_text('["is", "there", "mass"]')
    assert read_dictionary(tmp_path / "words.json").ids("Is there a mass?") == [0, 1, 2, 2]  # unknown -> last
    (tmp_path / "repeat.json").write_text('{"words": ["is", "is"]}')
    with pytest.raises(WordVectorError, match="distinct"):
        read_dictionary(tmp_path / "repeat.json")
    (tmp_path / "broken.json").write_text('["is",')
    with pytest.raises(WordVectorError, match="not valid JSON"):
        read_dictionary(tmp_path / "broken.json")


def test_glove_text_and_npy_loading(tmp_path):
    dictionary = QuestionDictionary.build(["is there a mass"])
    glove = tmp_path / "glove.txt"
    glove.write_text("the 0.1 0.2 0.3\nmass 1 2 3\nis -1 -2 -3.5\nnew york 7 8 9\n")
    vectors, found = load_word_vectors(glove, dictionary)
    assert vectors.shape == (5, 3) and vectors.dtype == np.float32 and found == 2
    np.testing.assert_allclose(vectors[dictionary.word_to_id["mass"]], [1, 2, 3])
    np.testing.assert_allclose(vectors[dictionary.word_to_id["is"]], [-1, -2, -3.5])
    assert not vectors[dictionary.word_to_id["there"]].any()

    np.save(tmp_path / "aligned.npy", np.ones((5, 4), dtype=np.float64))
    assert load_word_vectors(tmp_path / "aligned.npy", dictionary)[0].shape == (5, 4)
    np.save(tmp_path / "wrong.npy", np.ones((3, 4)))
    with pytest.raises(WordVectorError, match="one row per dictionary word"):
        load_word_vectors(tmp_path / "wrong.npy", dictionary)
    (tmp_path / "ragged.txt").write_text("is 1 2 3\nmass 1 2\n")
    with pytest.raises(WordVectorError, match="ragged.txt:2"):
        load_word_vectors(tmp_path / "ragged.txt", dictionary)
    (tmp_path / "bad.txt").write_text("is 1 2 x\n")
    with pytest.raises(WordVectorError, match="not a vector of numbers"):
        load_word_vectors(tmp_path / "bad.txt", dictionary)
    with pytest.raises(WordVectorError, match="does not exist"):
        load_word_vectors(tmp_path / "absent.txt", dictionary)


def test_tfidf_matrix_known_values():
    dictionary = QuestionDictionary.build(["a b", "a c"])  # a, b, c, <unk>
    matrix = tfidf_matrix(["a b", "a c"], dictionary)
    # counts a=2, b=1, c=1; pairs (a,b), (a,c) both ways, each weighted by 1/count(column), rows sum to 1
    expected = torch.tensor([[0, 0.5, 0.5, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(matrix, expected)
    # unequal weights: "a b c" adds (a,b) (a,c) (b,c); counts a=1, b=1, c=2
    matrix = tfidf_matrix(["a b c", "c"], dictionary)
    torch.testing.assert_close(matrix[0], torch.tensor([0, 1 / 1.5, 0.5 / 1.5, 0]))


def test_answer_vocabulary_splits_closed_and_open():
    records = load_records_from([
        dict(qid=1, image_name="x", question="q", answer="Yes", answer_type="CLOSED"),
        dict(qid=2, image_name="x", question="q", answer="left  lung", answer_type="OPEN"),
        dict(qid=3, image_name="x", question="q", answer="yes", answer_type="open"),
        dict(qid=4, image_name="x", question="q", answer="No", answer_type="CLOSED"),
    ])  # fmt: skip
    answers = AnswerVocabulary.build(records)
    assert answers.entries == [("yes", "CLOSED"), ("no", "CLOSED"), ("left lung", "OPEN"), ("yes", "OPEN")]
    assert answers.num_closed == 2
    assert answers.target("YES", "OPEN").tolist() == [0, 0, 0, 1]
    assert answers.target("maybe", "CLOSED").tolist() == [0, 0, 0, 0]
    assert AnswerVocabulary.from_json(answers.to_json()).entries == answers.entries


def load_records_from(items: list[dict], tmp: Path | None = None) -> list:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(tmp or folder) / "q.json"
        path.write_text(json.dumps(items))
        return load_records(path)


# ---------------------------------------------------------------------------------------------------------
# question files


def test_load_records_reads_vqa_rad_and_slake(tmp_path):
    rad = [dict(qid=5, image_name="synpic1.jpg", image_organ="HEAD", question="Is there a bleed?", answer="No",
                answer_type="CLOSED ", question_type="PRES", phrase_type="freeform")]  # fmt: skip
    (tmp_path / "rad.json").write_text(json.dumps(rad))
    (record,) = load_records(tmp_path / "rad.json")
    assert (record.qid, record.image_name, record.answer, record.answer_type, record.question_type) == (
        "5", "synpic1.jpg", "No", "CLOSED", "PRES",
    )  # fmt: skip
    slake = [
        dict(qid=1, img_name="xmlab1/source.jpg", question="Which organ?", answer="Liver", answer_type="OPEN",
             content_type="Organ", q_lang="en"),
        dict(qid=2, img_name="xmlab1/source.jpg", question="哪个器官?", answer="肝", answer_type="OPEN",
             content_type="Organ", q_lang="zh"),
        dict(qid=3, img_name="xmlab2/source.jpg", question="How many?", answer=2, answer_type="OPEN",
             content_type="Quantity", q_lang="en"),
    ]  # fmt: skip
    (tmp_path / "slake.json").write_text(json.dumps(slake, ensure_ascii=False))
    records = load_records(tmp_path / "slake.json")
    assert [r.qid for r in records] == ["1", "3"] and records[1].answer == "2"
    assert records[0].image_name == "xmlab1/source.jpg" and records[0].question_type == "Organ"
    assert len(load_records(tmp_path / "slake.json", language=None)) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"qid": 1, "image_name": "a.jpg",', "not valid JSON \\(line 1"),
        ('{"qid": 1}', "JSON list"),
        ("[]", "no question records"),
        (
            '[{"qid": 1, "image_name": "a.jpg", "question": "q?", "answer_type": "OPEN"}]',
            "record 0 \\(qid 1\\) lacks answer",
        ),
        (
            '[{"qid": 1, "question": "q?", "answer": "x", "answer_type": "OPEN"}]',
            "lacks image_name or img_name",
        ),
        (
            '[{"qid": 1, "image_name": "a", "question": "q?", "answer": "x", "answer_type": "yes/no"}]',
            "OPEN or CLOSED",
        ),
        (
            '[{"qid": 1, "image_name": "a", "question": "", "answer": "x", "answer_type": "OPEN"}]',
            "non-empty",
        ),
        (
            '[{"qid": 1, "image_name": "a", "question": "q", "answer": null, "answer_type": "OPEN"}]',
            "text or a number",
        ),
        ("[3]", "record 0 is a int"),
    ],
)
def test_load_records_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(MedVQADataError, match=message):
        load_records(path)


def test_missing_file_and_missing_images(tmp_path):
    with pytest.raises(MedVQADataError, match="does not exist"):
        load_records(tmp_path / "absent.json")
    records = load_records_from(spot_records(2, "m", tmp_path / "images", 0), tmp_path)
    (tmp_path / "images" / "m1.png").unlink()
    dictionary, answers = (
        QuestionDictionary.build([r.question for r in records]),
        AnswerVocabulary.build(records),
    )
    preprocess = build_preprocess({"image_size": 32})
    with pytest.raises(MedVQADataError, match="1 image\\(s\\) missing from .*m1.png"):
        MedVQADataset(records, tmp_path / "images", dictionary, answers, preprocess)
    with pytest.raises(MedVQADataError, match="image folder"):
        MedVQADataset(records, tmp_path / "nowhere", dictionary, answers, preprocess)
    (tmp_path / "images" / "m1.png").write_bytes(b"not a png")
    dataset = MedVQADataset(
        records, tmp_path / "images", dictionary, answers, preprocess, autoencoder_size=16
    )
    item = dataset[0]
    assert item["clip_pixels"].shape == (3, 32, 32) and item["ae_pixels"].shape == (1, 16, 16)
    assert 0 <= float(item["ae_pixels"].min()) and float(item["ae_pixels"].max()) <= 1
    with pytest.raises(MedVQADataError, match="cannot decode"):
        dataset[3]


# ---------------------------------------------------------------------------------------------------------
# layers


def test_weight_norm_linear_is_torch_weight_norm():
    torch.manual_seed(0)
    layer = WeightNormLinear(5, 3)
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(5, 3), dim=None)
    with torch.no_grad():
        reference.parametrizations.weight.original1.copy_(layer.weight_v)
        reference.parametrizations.weight.original0.copy_(layer.weight_g * 1.7)
        layer.weight_g.mul_(1.7)
        reference.bias.copy_(layer.bias)
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), reference(x))
    fresh = WeightNormLinear(5, 3)
    torch.testing.assert_close(fresh.weight, fresh.weight_v)  # initialised to the plain linear weight


def _fc(layer: WeightNormFC, x: torch.Tensor) -> torch.Tensor:
    """A weight-normalised FC layer written out: g * V / sqrt(sum V^2), then ReLU if the layer has one."""
    linear = next(m for m in layer if isinstance(m, WeightNormLinear))
    v = linear.weight_v
    weight = linear.weight_g * v / math.sqrt(float((v * v).sum()))
    y = x @ weight.T + linear.bias
    return y.clamp(min=0) if isinstance(layer[-1], torch.nn.ReLU) else y


def reference_ban(
    ban: BilinearAttentionNetwork, visual: torch.Tensor, question: torch.Tensor
) -> torch.Tensor:
    """Bilinear attention (BAN, 2018) with explicit sums, one example (V, Dv), (Q, H) -> (H,)."""
    att_map = ban.attention
    v, q = _fc(att_map.visual_net, visual), _fc(att_map.question_net, question)  # (V, kH), (Q, kH)
    p = att_map.projection_v
    p = att_map.projection_g * p / math.sqrt(float((p * p).sum()))
    num_v, num_q, rank = v.shape[0], q.shape[0], v.shape[1]
    attention = []
    for g in range(p.shape[0]):
        logits = [[sum(float(v[i, d] * p[g, d] * q[j, d]) for d in range(rank)) + float(att_map.bias[g])
                   for j in range(num_q)] for i in range(num_v)]  # fmt: skip
        top = max(max(row) for row in logits)
        exp = [[math.exp(x - top) for x in row] for row in logits]
        total = sum(map(sum, exp))
        attention.append([[x / total for x in row] for row in exp])
    question = question.clone()
    for g, (pool, project) in enumerate(zip(ban.pooling, ban.question_projections)):
        pv, pq = _fc(pool.visual_net, visual), _fc(pool.question_net, question)
        joint = torch.zeros(pv.shape[1])
        for i in range(num_v):
            for j in range(num_q):
                joint += pv[i] * attention[g][i][j] * pq[j]
        joint = joint.view(-1, pool.k).sum(-1)  # sum over groups of k consecutive dims
        question = question + _fc(project, joint)  # every question token gets the same update
    return question.sum(0)


@pytest.mark.parametrize("pooling_k", [1, 2])
def test_ban_matches_hand_written_bilinear_attention(pooling_k):
    torch.manual_seed(0)
    ban = BilinearAttentionNetwork(
        visual_dim=5, hidden_dim=4, glimpses=2, attention_k=3, pooling_k=pooling_k
    ).eval()
    visual, question = torch.randn(2, 3, 5), torch.randn(2, 4, 4)
    with torch.no_grad():
        output = ban(visual, question)
        expected = torch.stack([reference_ban(ban, visual[b], question[b]) for b in range(2)])
    assert output.shape == (2, 4)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_attention_is_a_distribution_and_respects_the_visual_mask():
    torch.manual_seed(0)
    ban = BilinearAttentionNetwork(visual_dim=5, hidden_dim=4).eval()
    visual, question = torch.randn(2, 3, 5), torch.randn(2, 4, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        attention, logits = ban.attention(visual, question, mask)
    assert attention.shape == logits.shape == (2, 2, 3, 4)
    torch.testing.assert_close(attention.sum((2, 3)), torch.ones(2, 2))
    assert float(attention[0, :, 2].abs().sum()) == 0 and float(attention[1, :, 2].sum()) > 0


def test_autoencoder_shapes_and_reference_checkpoint(tmp_path):
    autoencoder = ConvAutoencoder()
    pixels = torch.rand(2, 1, 128, 128)
    code = autoencoder.encode(pixels)
    assert code.shape == (2, 16, 32, 32)  # 16384 values, mapped to 64 by the model
    reconstruction = autoencoder.decode(code)
    assert (
        reconstruction.shape == (2, 1, 128, 128)
        and 0 <= float(reconstruction.detach().min()) <= float(reconstruction.detach().max()) <= 1
    )
    keys = set(autoencoder.state_dict())
    assert {"conv1.weight", "conv3.bias", "tran_conv1.weight", "tran_conv2.bias", "conv5.weight"} <= keys
    source = ConvAutoencoder()
    torch.save(source.state_dict(), tmp_path / "pretrained_ae.pth")
    load_autoencoder_weights(autoencoder, tmp_path / "pretrained_ae.pth")
    torch.testing.assert_close(autoencoder(pixels), source(pixels))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MedVQAConfigError, match="not an MEVF autoencoder checkpoint"):
        load_autoencoder_weights(autoencoder, tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------------------
# the model


def tiny_config(**overrides) -> MedVQAConfig:
    return MedVQAConfig(num_answers=5, vocab_size=9, clip=TINY_CLIP.to_dict(), **(TINY_OPTIONS | overrides))


@pytest.mark.parametrize("options", [{}, {"tfidf_embedding": True, "rnn": "gru"}, {"autoencoder": False}])
def test_model_shapes_and_every_parameter_gets_a_gradient(options):
    torch.manual_seed(0)
    model = MedVQAModel(tiny_config(**options))
    clip_pixels, ae_pixels = torch.randn(3, 3, 32, 32), torch.rand(3, 1, 16, 16)
    ids = torch.randint(0, 10, (3, 12))
    output = model(clip_pixels, ae_pixels, ids)
    assert output.logits.shape == (3, 5)
    if model.config.autoencoder:
        assert output.reconstruction.shape == (3, 1, 16, 16)
        assert model.visual_tokens(clip_pixels, ae_pixels)[0].shape == (3, 1, 32 + 16)
    else:
        assert output.reconstruction is None
        assert model.visual_tokens(clip_pixels, None)[0].shape == (3, 1, 32)
    loss = medvqa_loss(output.logits, torch.rand(3, 5), output.reconstruction, ae_pixels).total
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad


def test_real_size_model_matches_the_reference_dimensions():
    """PubMedCLIP ViT-B/32 + MEVF at the reference's sizes, built on the meta device (no memory)."""
    clip = polyclip.models.get_architecture("ViT-B-32").to_dict()
    with torch.device("meta"):
        model = MedVQAModel(MedVQAConfig(num_answers=487, vocab_size=1260, clip=clip, tfidf_embedding=True))
    config = model.config
    assert config.visual_dim == 576  # feat_dim_clip of run_pubmedclip.sh
    assert model.autoencoder_projection.weight.shape == (64, 16384)  # the reference's convert
    assert model.question_rnn.input_size == 600 and model.question_rnn.hidden_size == 1024
    assert model.question_rnn.num_layers == 1 and not model.question_rnn.bidirectional
    assert model.ban.attention.visual_net[1].weight_v.shape == (3072, 576)  # k=3 x 1024
    assert model.ban.attention.projection_v.shape == (2, 3072)
    assert len(model.ban.pooling) == 2 and model.ban.pooling[0].visual_net[1].weight_v.shape == (1024, 576)
    assert model.classifier[0].weight_v.shape == (2048, 1024) and model.classifier[3].weight_v.shape == (
        487,
        2048,
    )
    assert model.word_embedding.weight.shape == (1261, 300)


def test_config_errors():
    with pytest.raises(MedVQAConfigError, match="rnn"):
        tiny_config(rnn="transformer")
    with pytest.raises(MedVQAConfigError, match="multiple of 4"):
        tiny_config(autoencoder_size=30)
    with pytest.raises(MedVQAConfigError, match="unknown medvqa config"):
        MedVQAConfig.from_dict(tiny_config().to_dict() | {"hiden_dim": 3})
    with pytest.raises(MedVQAConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_init_word_embeddings_with_tfidf():
    model = MedVQAModel(tiny_config(tfidf_embedding=True, word_dim=3))
    vectors = torch.arange(27, dtype=torch.float32).view(9, 3)
    tfidf = torch.eye(9).roll(1, dims=1)
    model.init_word_embeddings(vectors.numpy(), tfidf)
    torch.testing.assert_close(model.word_embedding.weight[:9], vectors)
    torch.testing.assert_close(model.tfidf_embedding.weight[:9], tfidf @ vectors)
    assert not model.word_embedding.weight[9].any() and not model.tfidf_embedding.weight[9].any()
    with pytest.raises(MedVQAConfigError, match="shape"):
        model.init_word_embeddings(np.zeros((4, 3)), tfidf)


# ---------------------------------------------------------------------------------------------------------
# loss, schedule, metric


def test_loss_combines_summed_bce_and_weighted_mse_over_the_batch():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reconstruction, clean = torch.full((2, 1, 2, 2), 0.5), torch.zeros(2, 1, 2, 2)

    def bce(x, t):
        return -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))

    bce_sum = sum(bce(float(x), float(t)) for x, t in zip(logits.flatten(), targets.flatten()))
    parts = medvqa_loss(logits, targets, reconstruction, clean, autoencoder_weight=0.001)
    assert float(parts.answer) == pytest.approx(bce_sum)
    assert float(parts.reconstruction) == pytest.approx(0.25)
    assert float(parts.total) == pytest.approx((bce_sum + 0.001 * 0.25) / 2)
    assert float(medvqa_loss(logits, targets).total) == pytest.approx(bce_sum / 2)


def test_learning_rate_follows_the_reference_schedule():
    config = TrainConfig()
    rates = [learning_rate(config, epoch) for epoch in range(20)]
    assert rates[:4] == pytest.approx([0.001, 0.002, 0.003, 0.004])
    assert rates[4:10] == pytest.approx([0.004] * 6)
    assert rates[10] == pytest.approx(0.003) and rates[11] == pytest.approx(0.003)
    assert rates[19] == pytest.approx(0.004 * 0.75**5)


def test_metric_on_known_answers():
    predicted = ["Yes", "no", "left lung", "liver", "CT"]
    expected = ["yes", "yes", "left  lung", "spleen", "ct"]
    scores = score_answers(predicted, expected)
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    report = accuracy_by_type(
        scores, ["CLOSED", "CLOSED", "OPEN", "OPEN", "OPEN"], ["PRES", "PRES", "POS", "ORGAN", ""]
    )
    assert report.overall == pytest.approx(0.6) and report.closed == pytest.approx(0.5)
    assert report.open == pytest.approx(2 / 3)
    assert report.counts == {"overall": 5, "closed": 2, "open": 3}
    assert report.by_question_type == {"ORGAN": 0.0, "POS": 1.0, "PRES": 0.5}
    assert accuracy_by_type([1.0], ["OPEN"]).closed is None
    logits = torch.tensor([[0.1, 0.9, 0.0], [2.0, 0.0, 1.0]])
    targets = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert answer_scores(logits, targets).tolist() == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# PubMedCLIP checkpoints, training, saving, the CLI


def pubmedclip_file(path: Path) -> Path:
    """A tiny model in PubMedCLIP's training-checkpoint format, with OpenAI's key names."""
    from polyclip.checkpoints.open_clip import to_open_clip_state_dict

    clip, _ = tiny_clip(3)
    state = to_open_clip_state_dict(clip.state_dict(), "vit", custom_text=False)
    torch.save({"best_epoch": 12, "state_dict": state, "optimizer_state_dict": {}}, path)
    return path


def test_build_from_a_pubmedclip_checkpoint_uses_its_image_tower(tmp_path, spot_data):
    path = pubmedclip_file(tmp_path / "pubmedclip.pth")
    reference, preprocess, _ = polyclip.load(path)
    records = load_records(spot_data / "train.json")
    glove = tmp_path / "glove.txt"
    glove.write_text(
        "".join(f"{w} " + " ".join(str(0.1 * i) for i in range(5)) + "\n" for w in ("is", "spot", "where"))
    )
    vqa = MedVQA.build(
        path, records, word_vectors=glove, **(TINY_OPTIONS | {"word_dim": 5, "tfidf_embedding": True})
    )
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vqa.model.clip_visual(pixels), reference.encode_image(pixels))
    assert vqa.preprocess.config == preprocess.config
    assert vqa.config.clip == reference.config.to_dict() and vqa.config.visual_dim == 32 + 16
    assert vqa.answers.entries == [("yes", "CLOSED"), ("no", "CLOSED"), ("left", "OPEN"), ("right", "OPEN")]
    spot = vqa.dictionary.word_to_id["spot"]
    torch.testing.assert_close(vqa.model.word_embedding.weight[spot], torch.arange(5) * 0.1)
    with pytest.raises(MedVQAConfigError, match="come from the data"):
        MedVQA.build(path, records, num_answers=3)
    own = MedVQA.build(path, records, preprocess="pubmedclip", **TINY_OPTIONS)
    assert own.preprocess.config.crop_pct == 0.875 and own.preprocess.config.image_size == 32
    assert own.preprocess.config.mean == (0.485, 0.456, 0.406)


def test_tiny_training_learns_the_spot_task_and_round_trips(tmp_path, spot_data):
    clip, preprocess = tiny_clip(0)
    train_records, test_records = (
        load_records(spot_data / "train.json"),
        load_records(spot_data / "test.json"),
    )
    # no dropout and a wider joint space: the tiny run converges in a few hundred steps on every seed tried
    options = TINY_OPTIONS | dict(hidden_dim=64, dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
    vqa = MedVQA.build((clip, preprocess), train_records, **options)

    def dataset(records):
        return MedVQADataset(records, spot_data / "images", vqa.dictionary, vqa.answers, vqa.preprocess, 16)

    train_set, test_set = dataset(train_records), dataset(test_records)
    before = evaluate(vqa, test_set).report.overall
    result = train(vqa, train_set, config=TrainConfig(epochs=12, batch_size=16, device="cpu"))
    assert len(result.history) == 12 and result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["reconstruction_mse"] < result.history[0]["reconstruction_mse"]
    evaluation = evaluate(vqa, test_set)
    report = evaluation.report
    # chance: 1/2 on both kinds; a question-only model cannot beat it (the answer depends on the image)
    assert report.overall >= 0.85 and report.closed >= 0.75 and report.open >= 0.75, (before, report)
    assert len(evaluation.predictions) == 48

    image = spot_data / "images" / "te0.png"  # spot on the left
    answer, score = vqa.answer(image, "Where is the bright spot?")
    assert answer == "left" and 0.5 < score <= 1.0
    vqa.save(tmp_path / "model")
    loaded = MedVQA.load(tmp_path / "model")
    questions = [
        "Is the bright spot on the right?",
        "where is the bright spot",
        "Is the bright spot on the left?",
    ]
    images = [spot_data / "images" / f"te{i}.png" for i in range(3)]
    expected = vqa.answer_batch(images, questions)
    got = loaded.answer_batch(images, questions)
    assert [a for a, _ in got] == [a for a, _ in expected] == ["no", "right", "yes"]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-6)
    assert evaluate(loaded, test_set).report.overall == pytest.approx(report.overall)


def test_load_errors(tmp_path):
    with pytest.raises(MedVQAConfigError, match="medvqa.json is missing"):
        MedVQA.load(tmp_path)
    (tmp_path / "medvqa.json").write_text('{"format": "other"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(MedVQAConfigError, match="not a polyclip-medvqa file"):
        MedVQA.load(tmp_path)


def test_cli_train_evaluate_answer(tmp_path, spot_data):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from polyclip.cli.medvqa import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    clip = pubmedclip_file(tmp_path / "pubmedclip.pth")
    out = tmp_path / "model"
    args = ["medvqa", "train", "--train", str(spot_data / "test.json"), "--images", str(spot_data / "images"),
            "--out", str(out), "--clip", str(clip), "--epochs", "1", "--batch-size", "24", "--hidden-dim", "16",
            "--rnn", "gru", "--autoencoder-size", "16", "--preprocess", "pubmedclip", "--device", "cpu",
            "--no-tfidf"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "saved to" in result.output and (out / "medvqa.json").is_file()
    assert json.loads((out / "history.json").read_text())[0]["epoch"] == 0
    report = tmp_path / "results.json"
    result = runner.invoke(app, ["medvqa", "evaluate", "--model", str(out), "--data", str(spot_data / "test.json"),
                                 "--images", str(spot_data / "images"), "--out", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "closed" in result.output and "(32 questions)" in result.output
    payload = json.loads(report.read_text())
    assert payload["accuracy"]["counts"]["overall"] == 48 and len(payload["predictions"]) == 48
    result = runner.invoke(app, ["medvqa", "answer", "--model", str(out), "--image",
                                 str(spot_data / "images" / "te0.png"), "-q", "Where is the bright spot?", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["answer"] in {"yes", "no", "left", "right"}
    result = runner.invoke(app, ["medvqa", "evaluate", "--model", str(out), "--data", str(tmp_path / "none.json"),
                                 "--images", str(spot_data / "images")])  # fmt: skip
    assert result.exit_code != 0 and "does not exist" in str(result.exception)
