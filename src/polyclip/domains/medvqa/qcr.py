"""QCR, PubMedCLIP's other VQA model (reference ``QCR_PubMedCLIP``, after "Medical Visual Question
Answering via Conditional Reasoning", ACM MM 2020): a question-type classifier routes each question to a
closed or an open branch, each its own bilinear attention network and answer head, and a type-attention
vector of the question gates the joint feature.

Reference modules (``lib/BAN/multi_level_model.py`` ``BAN_Model``, ``lib/language/classify_question.py``):

- visual token: CLIP ``encode_image`` (B, E) concatenated with the autoencoder's 64-d code, as MEVF;
- question: GloVe + tf-idf embeddings (600-d, ``QUESTION.CAT``) -> GRU with 1024 units, every state kept;
- ``typeatt``: a 300-d embedding -> GRU(1024) -> gated attention over the words (``QuestionAttention``) ->
  FC 1024 -> 2048 -> ReLU -> 1024 -> dropout -> ReLU -> 1024, multiplied into each branch's output (so the
  joint size is 1024);
- the question-type classifier (``classify_model``, its own checkpoint ``type_classifier.pth``): the same
  encoder with FC 1024 -> 256 -> 64 -> 2; class 0 routes a question to the closed branch, 1 to the open one;
- heads: ``close_classifier`` over the closed answers, ``open_classifier`` over the open ones (the
  trainval answer labels minus the number of closed answers); ``bbn_classifier`` (the BBN combiner's
  mixed head of training) is kept so that checkpoints load strictly, and is not used to answer.

The reference's ``typeatt`` and ``classify_model`` call ``F.dropout(x)``, whose ``training`` argument
defaults to True: half of a hidden vector is dropped at test time too, so its answers are random unless
the torch generator is seeded. ``QCRConfig.reference_dropout`` keeps that behaviour (for reproducing its
numbers, with the same seed and the same call order: type attention, then the type classifier);
False is the deterministic model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import polyclip
from polyclip.domains.medvqa.autoencoder import CODE_CHANNELS, ConvAutoencoder
from polyclip.domains.medvqa.errors import MedVQAConfigError
from polyclip.domains.medvqa.layers import AnswerClassifier, BilinearAttentionNetwork
from polyclip.models import DualEncoderConfig

TYPE_HIDDEN = 1024  # hard-coded in the reference's typeAttention / classify_model


@dataclass
class QCRConfig:
    num_closed: int
    num_open: int
    vocab_size: int
    clip: dict[str, Any] = field(default_factory=dict)
    word_dim: int = 300
    tfidf_embedding: bool = True  # QUESTION.CAT
    hidden_dim: int = TYPE_HIDDEN  # QUESTION.HID_DIM; must equal the type attention's 1024
    glimpses: int = 10  # ATTENTION.GLIMPSE of the released configs
    attention_k: int = 3
    dropout: float = 0.2
    attention_dropout: float = 0.5
    classifier_dropout: float = 0.5  # TRAIN.DROPOUT
    question_length: int = 12
    autoencoder_size: int = 128
    autoencoder_dim: int = 64
    reference_dropout: bool = True  # the reference's F.dropout(x) in the type networks at test time

    def __post_init__(self) -> None:
        if self.hidden_dim != TYPE_HIDDEN:
            raise MedVQAConfigError(
                f"QCR's type attention is {TYPE_HIDDEN}-d, so hidden_dim must be {TYPE_HIDDEN}"
            )
        for name in ("num_closed", "num_open", "vocab_size", "glimpses"):
            if getattr(self, name) < 1:
                raise MedVQAConfigError(f"{name} must be positive")

    @property
    def clip_config(self) -> DualEncoderConfig:
        return DualEncoderConfig.from_dict(self.clip)

    @property
    def visual_dim(self) -> int:
        return self.clip_config.embed_dim + self.autoencoder_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class QuestionTypeNet(nn.Module):
    """``typeAttention`` (dims 2048, 1024, 1024) or ``classify_model`` (dims 256, 64, 2) of the reference."""

    def __init__(
        self, vocab_size: int, dims: tuple[int, int, int], word_dim: int = 300, reference_dropout=True
    ):
        super().__init__()
        self.word_embedding = nn.Embedding(vocab_size + 1, word_dim, padding_idx=vocab_size)
        self.rnn = nn.GRU(word_dim, TYPE_HIDDEN, 1, batch_first=True)
        self.tanh_gate = nn.Linear(word_dim + TYPE_HIDDEN, TYPE_HIDDEN)
        self.sigmoid_gate = nn.Linear(word_dim + TYPE_HIDDEN, TYPE_HIDDEN)
        self.attention = nn.Linear(TYPE_HIDDEN, 1)
        self.fc1 = nn.Linear(TYPE_HIDDEN, dims[0])
        self.fc2 = nn.Linear(dims[0], dims[1])
        self.fc3 = nn.Linear(dims[1], dims[2])
        self.reference_dropout = reference_dropout

    def forward(self, question_ids: torch.Tensor) -> torch.Tensor:
        words = self.word_embedding(question_ids)  # (B, L, 300)
        states, _ = self.rnn(words)  # (B, L, 1024)
        joined = torch.cat([words, states], dim=-1)
        gated = torch.tanh(self.tanh_gate(joined)) * torch.sigmoid(self.sigmoid_gate(joined))
        weights = self.attention(gated).squeeze(-1).softmax(dim=1)  # (B, L) over the words
        pooled = torch.bmm(weights.unsqueeze(1), states).squeeze(1)  # (B, 1024)
        x = F.relu(self.fc1(pooled))
        x = self.fc2(x)
        x = F.dropout(x, 0.5, training=self.reference_dropout or self.training)
        return self.fc3(F.relu(x))


@dataclass
class QCROutput:
    is_open: torch.Tensor  # (B,) bool: the type classifier's routing (or the given one)
    closed_logits: torch.Tensor  # (B_closed, num_closed), rows of the closed questions in batch order
    open_logits: torch.Tensor  # (B_open, num_open)
    reconstruction: torch.Tensor  # (B, 1, s, s)


class QCRModel(nn.Module):
    def __init__(self, config: QCRConfig, clip_visual: nn.Module | None = None):
        super().__init__()
        self.config = config
        if clip_visual is None:
            clip_visual = polyclip.create_model(config.clip_config).visual
        self.clip_visual = clip_visual
        vocab, hidden = config.vocab_size, config.hidden_dim
        self.word_embedding = nn.Embedding(vocab + 1, config.word_dim, padding_idx=vocab)
        self.tfidf_embedding = (
            nn.Embedding(vocab + 1, config.word_dim, padding_idx=vocab) if config.tfidf_embedding else None
        )
        question_dim = config.word_dim * (2 if config.tfidf_embedding else 1)
        self.question_rnn = nn.GRU(question_dim, hidden, 1, batch_first=True)
        self.autoencoder = ConvAutoencoder()
        code_size = CODE_CHANNELS * (config.autoencoder_size // 4) ** 2
        self.autoencoder_projection = nn.Linear(code_size, config.autoencoder_dim)

        def branch() -> BilinearAttentionNetwork:
            return BilinearAttentionNetwork(
                config.visual_dim, hidden, config.glimpses, config.attention_k, 1, config.dropout,
                config.attention_dropout,
            )  # fmt: skip

        self.closed, self.open = branch(), branch()
        self.closed_classifier = AnswerClassifier(
            hidden, 2 * hidden, config.num_closed, config.classifier_dropout
        )
        self.open_classifier = AnswerClassifier(
            hidden, 2 * hidden, config.num_open, config.classifier_dropout
        )
        self.mixed_classifier = AnswerClassifier(
            2 * hidden, 3 * hidden, config.num_closed + config.num_open, config.classifier_dropout
        )  # the reference's bbn_classifier (training only)
        self.type_attention = QuestionTypeNet(vocab, (2048, 1024, 1024), 300, config.reference_dropout)

    def forward(
        self,
        clip_pixels: torch.Tensor,
        ae_pixels: torch.Tensor,
        question_ids: torch.Tensor,
        type_classifier: QuestionTypeNet | None = None,
        is_open: torch.Tensor | None = None,
    ) -> QCROutput:
        """Route by ``is_open`` (B,) or by ``type_classifier``'s argmax (the reference's test path)."""
        code = self.autoencoder.encode(ae_pixels)
        reconstruction = self.autoencoder.decode(code)
        visual = torch.cat([self.clip_visual(clip_pixels), self.autoencoder_projection(code.flatten(1))], 1)
        visual = visual.unsqueeze(1)  # (B, 1, E + 64)
        gate = self.type_attention(question_ids)  # (B, 1024); first, as the reference draws its dropout
        words = self.word_embedding(question_ids)
        if self.tfidf_embedding is not None:
            words = torch.cat([words, self.tfidf_embedding(question_ids)], dim=2)
        states, _ = self.question_rnn(words)  # (B, L, H)
        if is_open is None:
            if type_classifier is None:
                raise MedVQAConfigError("QCR routes questions with its type classifier: pass it, or is_open")
            is_open = type_classifier(question_ids).argmax(dim=1) != 0
        is_open = is_open.bool()
        closed, opened = ~is_open, is_open
        closed_joint = self.closed(visual[closed], states[closed]) * gate[closed]
        open_joint = self.open(visual[opened], states[opened]) * gate[opened]
        return QCROutput(
            is_open, self.closed_classifier(closed_joint), self.open_classifier(open_joint), reconstruction
        )


# ---------------------------------------------------------------------------------------------------------
# the reference's checkpoints


def _wn(prefix: str, source: str) -> dict[str, str]:
    return {f"{prefix}.{p}": f"{source}.{p}" for p in ("weight_g", "weight_v", "bias")}


def _type_net_keys(prefix: str, source: str) -> dict[str, str]:
    keys = {f"{prefix}.word_embedding.weight": f"{source}w_emb.emb.weight"}
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        keys[f"{prefix}.rnn.{name}"] = f"{source}q_emb.rnn.{name}"
    for ours, theirs in (("tanh_gate", "q_final.tanh_gate"), ("sigmoid_gate", "q_final.sigmoid_gate"),
                         ("attention", "q_final.attn"), ("fc1", "f_fc1"), ("fc2", "f_fc2"), ("fc3", "f_fc3")):  # fmt: skip
        for p in ("weight", "bias"):
            keys[f"{prefix}.{ours}.{p}"] = f"{source}{theirs}.{p}"
    return {k.removeprefix("."): v for k, v in keys.items()}


def qcr_key_map(glimpses: int, tfidf: bool) -> dict[str, str]:
    """polyclip key -> reference key, except the CLIP tower and the attention maps' h_mat."""
    keys = {"word_embedding.weight": "w_emb.emb.weight"}
    if tfidf:
        keys["tfidf_embedding.weight"] = "w_emb.emb_.weight"
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        keys[f"question_rnn.{name}"] = f"q_emb.rnn.{name}"
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "tran_conv1", "tran_conv2"):
        for p in ("weight", "bias"):
            keys[f"autoencoder.{layer}.{p}"] = f"ae.{layer}.{p}"
    keys["autoencoder_projection.weight"], keys["autoencoder_projection.bias"] = (
        "convert.weight",
        "convert.bias",
    )
    for ours, theirs in (("closed", "close"), ("open", "open")):
        keys.update(_wn(f"{ours}.attention.visual_net.1", f"{theirs}_att.logits.v_net.main.1"))
        keys.update(_wn(f"{ours}.attention.question_net.1", f"{theirs}_att.logits.q_net.main.1"))
        for g in range(glimpses):
            keys.update(_wn(f"{ours}.pooling.{g}.visual_net.1", f"{theirs}_resnet.b_net.{g}.v_net.main.1"))
            keys.update(_wn(f"{ours}.pooling.{g}.question_net.1", f"{theirs}_resnet.b_net.{g}.q_net.main.1"))
            keys.update(_wn(f"{ours}.question_projections.{g}.1", f"{theirs}_resnet.q_prj.{g}.main.1"))
        for index in (0, 3):
            keys.update(_wn(f"{ours}_classifier.{index}", f"{theirs}_classifier.main.{index}"))
    for index in (0, 3):
        keys.update(_wn(f"mixed_classifier.{index}", f"bbn_classifier.main.{index}"))
    keys.update(_type_net_keys("type_attention", "typeatt."))
    return keys


def _take(rest: dict[str, torch.Tensor], keys: dict[str, str], mapped: dict, missing: list) -> None:
    for ours, theirs in keys.items():
        if theirs in rest:
            mapped[ours] = rest.pop(theirs)
        else:
            missing.append(theirs)


def qcr_from_reference_state(state: dict[str, torch.Tensor], num_closed: int, source: str = "checkpoint"):
    """A ``QCRModel`` from the reference ``BAN_Model``'s state (``clip.*`` in OpenAI layout), strictly."""
    from polyclip.domains.medvqa.reference import clip_tower_from_state

    clip_state = {k[len("clip.") :]: v for k, v in state.items() if k.startswith("clip.")}
    rest = {k: v for k, v in state.items() if not k.startswith("clip.")}
    if not clip_state:
        raise MedVQAConfigError(f"{source} holds no CLIP model (clip.*): was it trained with VISION.CLIP?")
    try:
        embedding = rest["w_emb.emb.weight"]
        heads = {name: rest[f"{name}_classifier.main.3.weight_v"].shape[0] for name in ("close", "open")}
        h_mats = {name: [rest.pop(f"{name}_att.logits.{p}") for p in ("h_mat_v", "h_mat_g", "h_bias")]
                  for name in ("close", "open")}  # fmt: skip
    except KeyError as error:
        raise MedVQAConfigError(f"{source} is not a reference QCR model (no {error.args[0]})") from None
    if heads["close"] != num_closed:
        raise MedVQAConfigError(f"{source} has {heads['close']} closed answers; the data folder {num_closed}")
    glimpses = h_mats["close"][0].shape[1]
    hidden = rest["q_emb.rnn.weight_hh_l0"].shape[1]
    tfidf = "w_emb.emb_.weight" in rest
    mapped: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    _take(rest, qcr_key_map(glimpses, tfidf), mapped, missing)
    for ours, theirs in (("closed", "close"), ("open", "open")):
        h_mat_v, h_mat_g, h_bias = h_mats[theirs]
        mapped[f"{ours}.attention.projection_v"] = h_mat_v.reshape(glimpses, -1)  # (1, G, 1, kH) -> (G, kH)
        mapped[f"{ours}.attention.projection_g"] = h_mat_g.reshape(())
        mapped[f"{ours}.attention.bias"] = h_bias.reshape(glimpses)  # (1, G, 1, 1) -> (G,)
    if missing or rest:  # before anything is built: a wrong file fails fast
        raise MedVQAConfigError(
            f"{source} does not fit the reference QCR model: missing {missing[:5]}, unexpected {sorted(rest)[:5]}"
        )
    clip_model = clip_tower_from_state(clip_state)
    config = QCRConfig(
        num_closed=heads["close"], num_open=heads["open"], vocab_size=embedding.shape[0] - 1,
        clip=clip_model.config.to_dict(), word_dim=embedding.shape[1], tfidf_embedding=tfidf, hidden_dim=hidden,
        glimpses=glimpses, attention_k=h_mats["close"][0].shape[-1] // hidden,
    )  # fmt: skip
    visual = clip_model.visual.float()
    with torch.device("meta"):  # every weight comes from the file: no initialisation
        model = QCRModel(config, clip_visual=visual)
    mapped.update({f"clip_visual.{k}": v for k, v in visual.state_dict().items()})
    try:
        model.load_state_dict(mapped, strict=True, assign=True)
    except RuntimeError as error:
        raise MedVQAConfigError(f"{source}: {error}") from None
    return model.eval()


def type_classifier_from_reference_state(
    state: dict[str, torch.Tensor], vocab_size: int, reference_dropout=True
):
    """The reference's ``classify_model`` (``type_classifier.pth``: a state dict, or ``{"model_state"}``)."""
    state = dict(state.get("model_state", state))
    net = QuestionTypeNet(vocab_size, (256, 64, 2), 300, reference_dropout)
    mapped: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    _take(state, _type_net_keys("", ""), mapped, missing)
    if missing or state:
        raise MedVQAConfigError(
            f"not a reference question-type classifier: missing {missing[:5]}, unexpected {sorted(state)[:5]}"
        )
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as error:
        raise MedVQAConfigError(f"the question-type classifier does not fit: {error}") from None
    return net.eval()


@dataclass
class QCR:
    """A QCR system: the model, its question-type classifier, the dictionary and both answer lists."""

    model: QCRModel
    type_classifier: QuestionTypeNet
    dictionary: Any  # QuestionDictionary
    closed_answers: list[str]  # close_label2ans.pkl
    open_answers: list[str]  # open_label2ans.pkl (an answer also closed carries the reference's "#")
    preprocess: Any  # ReferenceClipPixels

    @classmethod
    def from_reference(cls, checkpoint, type_classifier, data_dir) -> QCR:
        """A model saved by ``QCR_PubMedCLIP``'s trainer, its ``type_classifier.pth``, and its data folder
        (``dictionary.pkl``, ``cache/close_label2ans.pkl``, ``cache/open_label2ans.pkl``)."""
        from polyclip.domains.medvqa.reference import (
            ReferenceClipPixels,
            ReferenceData,
            read_plain_pickle,
            read_reference_checkpoint,
        )
        from polyclip.domains.medvqa.text import QuestionDictionary

        data = ReferenceData(data_dir)
        words = data.words()
        lists = []
        for name in ("close_label2ans.pkl", "open_label2ans.pkl"):
            value = read_plain_pickle(data._find(name))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise MedVQAConfigError(f"{name} of {data_dir} is not a list of answers")
            lists.append(value)
        state, _ = read_reference_checkpoint(checkpoint)
        model = qcr_from_reference_state(state, len(lists[0]), str(checkpoint))
        if model.config.num_open != len(lists[1]) or model.config.vocab_size != len(words):
            raise MedVQAConfigError(f"{checkpoint} was not trained on the data folder {data_dir}")
        type_state, _ = read_reference_checkpoint(type_classifier)
        type_net = type_classifier_from_reference_state(type_state, len(words))
        size = 288 if model.config.clip_config.vision.image_size == 288 else 250
        return cls(model, type_net, QuestionDictionary(words), lists[0], lists[1], ReferenceClipPixels(size))

    @torch.no_grad()
    def answer_batch(self, images, questions: list[str]) -> list[tuple[str, str]]:
        """(answer, "CLOSED" | "OPEN") per question: the routed branch's best answer."""
        from polyclip.domains.medvqa.data import autoencoder_pixels
        from polyclip.images import load_image

        decoded = [load_image(image) for image in images]
        clip_pixels = torch.stack([self.preprocess(image) for image in decoded])
        ae_pixels = torch.stack(
            [autoencoder_pixels(image, self.model.config.autoencoder_size) for image in decoded]
        )
        ids = self.dictionary.encode_batch(list(questions), self.model.config.question_length)
        output = self.model.eval()(clip_pixels, ae_pixels, ids, type_classifier=self.type_classifier.eval())
        closed = iter(output.closed_logits.argmax(1).tolist())
        opened = iter(output.open_logits.argmax(1).tolist())
        return [
            (self.open_answers[next(opened)].removesuffix("#"), "OPEN")
            if is_open
            else (self.closed_answers[next(closed)], "CLOSED")
            for is_open in output.is_open.tolist()
        ]


__all__ = [
    "QCR",
    "QCRConfig",
    "QCRModel",
    "QCROutput",
    "QuestionTypeNet",
    "qcr_from_reference_state",
    "qcr_key_map",
    "type_classifier_from_reference_state",
]
