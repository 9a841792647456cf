"""PubMedCLIP's medical VQA model: MEVF + BAN with a CLIP image tower ("PubMedCLIP: How Much Does
CLIP Benefit Visual Question Answering in the Medical Domain?", EACL 2023 Findings; reference ``MEVF_PubMedCLIP/base_model.py`` of sarahESL/PubMedCLIP, ``BAN_Model`` with
``--clip --autoencoder``).

Visual input: the CLIP image embedding (B, E) (``encode_image``, 512-d for ViT-B/32) concatenated
with the autoencoder's 64-d code (B, 64) along the feature dimension, giving ONE pooled visual token
(B, 1, E + 64) (576 for ViT-B/32, 1088 for RN50, 704 for RN50x4, the reference's ``feat_dim_clip``).
Question: word embeddings (300-d GloVe, or 600-d with the tf-idf smoothed copy) -> 1-layer
unidirectional LSTM (MEVF's default; GRU optional) with 1024 hidden units, every step's state kept
(B, 12, 1024). BAN (``layers.py``) joins them; the classifier maps the (B, 1024) joint vector to the
answer logits. Both image branches and the word embeddings are trained with the rest, as in the
reference (``TrainConfig.freeze_clip`` can freeze the CLIP tower).

Where this differs from the reference: the CLIP tower gets its checkpoint's own preprocessing
(PubMedCLIP: resize 256, centre crop 224, ImageNet statistics); the reference feeds 250x250 images
scaled to 0..1 without normalisation, stored height-width-channel and reshaped (not permuted) to
channel-first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import polyclip
from polyclip.domains.medvqa.autoencoder import CODE_CHANNELS, ConvAutoencoder
from polyclip.domains.medvqa.errors import MedVQAConfigError
from polyclip.domains.medvqa.layers import AnswerClassifier, BilinearAttentionNetwork
from polyclip.models import ConfigError, DualEncoderConfig

RNNS = {"lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class MedVQAConfig:
    num_answers: int  # classifier outputs: the answer vocabulary's size
    vocab_size: int  # words of the question dictionary; id vocab_size is padding
    # DualEncoderConfig.to_dict() of the CLIP model whose image tower is used (rebuilds it on load)
    clip: dict[str, Any] = field(default_factory=dict)
    word_dim: int = 300  # GloVe 6B 300-d
    tfidf_embedding: bool = True  # main.py's default --op c: a second, tf-idf smoothed embedding (600-d)
    rnn: str = "lstm"  # MEVF's --rnn default; "gru" as in ban-vqa
    hidden_dim: int = 1024  # --num_hid: RNN state, BAN hidden and joint size
    glimpses: int = 2  # --gamma
    attention_k: int = 3  # BCNet rank multiplier of the attention map
    pooling_k: int = 1  # BCNet rank multiplier of the residual pooling
    dropout: float = 0.2  # before BAN's FC layers
    attention_dropout: float = 0.5
    classifier_dropout: float = 0.5  # --dropout
    question_length: int = 12  # --question_len
    autoencoder: bool = True  # --autoencoder (the reference's PubMedCLIP runs all use it)
    autoencoder_size: int = 128  # grey input side; the code is 16 x size/4 x size/4
    autoencoder_dim: int = 64  # the code after the linear map (``convert``)

    def __post_init__(self) -> None:
        positive = ("num_answers", "vocab_size", "word_dim", "hidden_dim", "glimpses", "attention_k",
                    "pooling_k", "question_length", "autoencoder_size", "autoencoder_dim")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MedVQAConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.rnn not in RNNS:
            raise MedVQAConfigError(f"rnn must be one of {sorted(RNNS)}, got {self.rnn!r}")
        if self.autoencoder_size % 4:
            raise MedVQAConfigError(f"autoencoder_size must be a multiple of 4, got {self.autoencoder_size}")
        for name in ("dropout", "attention_dropout", "classifier_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise MedVQAConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def clip_config(self) -> DualEncoderConfig:
        try:
            return DualEncoderConfig.from_dict(self.clip)
        except (ConfigError, TypeError, ValueError) as error:
            raise MedVQAConfigError(f"the CLIP config is invalid: {error}") from None

    @property
    def visual_dim(self) -> int:
        return self.clip_config.embed_dim + (self.autoencoder_dim if self.autoencoder else 0)

    @property
    def question_input_dim(self) -> int:
        return self.word_dim * (2 if self.tfidf_embedding else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MedVQAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MedVQAConfigError(f"unknown medvqa config key(s): {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as error:
            raise MedVQAConfigError(f"incomplete medvqa config: {error}") from None


@dataclass
class MedVQAOutput:
    logits: torch.Tensor  # (B, A) answer logits
    reconstruction: torch.Tensor | None  # (B, 1, s, s) autoencoder output, None without autoencoder


class MedVQAModel(nn.Module):
    def __init__(self, config: MedVQAConfig, clip_visual: nn.Module | None = None):
        """``clip_visual``: a dual encoder's image tower (``model.visual`` of ``polyclip.load``);
        None builds a randomly initialised one from ``config.clip``."""
        super().__init__()
        self.config = config
        if clip_visual is None:
            clip_visual = polyclip.create_model(config.clip_config).visual
        self.clip_visual = clip_visual  # (B, 3, S, S) -> (B, E)
        padding = config.vocab_size
        self.word_embedding = nn.Embedding(config.vocab_size + 1, config.word_dim, padding_idx=padding)
        self.tfidf_embedding = (
            nn.Embedding(config.vocab_size + 1, config.word_dim, padding_idx=padding)
            if config.tfidf_embedding
            else None
        )
        self.question_rnn = RNNS[config.rnn](
            config.question_input_dim, config.hidden_dim, 1, batch_first=True
        )
        if config.autoencoder:
            self.autoencoder = ConvAutoencoder()
            code_size = CODE_CHANNELS * (config.autoencoder_size // 4) ** 2  # 16384 at 128 px
            self.autoencoder_projection = nn.Linear(code_size, config.autoencoder_dim)
        else:
            self.autoencoder = self.autoencoder_projection = None
        self.ban = BilinearAttentionNetwork(
            config.visual_dim, config.hidden_dim, config.glimpses, config.attention_k, config.pooling_k,
            config.dropout, config.attention_dropout,
        )  # fmt: skip
        self.classifier = AnswerClassifier(
            config.hidden_dim, 2 * config.hidden_dim, config.num_answers, config.classifier_dropout
        )

    @property
    def device(self) -> torch.device:
        return self.word_embedding.weight.device

    def init_word_embeddings(
        self, vectors: np.ndarray | torch.Tensor, tfidf: torch.Tensor | None = None
    ) -> None:
        """GloVe vectors (N, D) into the embedding (the padding row stays zero); with the tf-idf
        variant the second embedding gets ``tfidf @ vectors`` (N, N) x (N, D)."""
        vectors = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        expected = (self.config.vocab_size, self.config.word_dim)
        if tuple(vectors.shape) != expected:
            raise MedVQAConfigError(
                f"word vectors have shape {tuple(vectors.shape)}, the model needs {expected}"
            )
        with torch.no_grad():
            self.word_embedding.weight[: self.config.vocab_size] = vectors
            self.word_embedding.weight[self.config.vocab_size] = 0
            if self.tfidf_embedding is not None:
                if tfidf is None:
                    raise MedVQAConfigError(
                        "the tf-idf embedding needs the tf-idf matrix of the training questions"
                    )
                self.tfidf_embedding.weight[: self.config.vocab_size] = tfidf.to(vectors) @ vectors
                self.tfidf_embedding.weight[self.config.vocab_size] = 0

    def visual_tokens(
        self, clip_pixels: torch.Tensor, ae_pixels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> visual tokens (B, 1, E [+ 64]) and the autoencoder's reconstruction (B, 1, s, s) or None."""
        features = self.clip_visual(clip_pixels)  # (B, E)
        reconstruction = None
        if self.autoencoder is not None:
            if ae_pixels is None:
                raise MedVQAConfigError("the model has an autoencoder branch: pass the grey images too")
            code = self.autoencoder.encode(ae_pixels)  # (B, 16, s/4, s/4)
            reconstruction = self.autoencoder.decode(code)  # (B, 1, s, s)
            ae_features = self.autoencoder_projection(code.flatten(1))  # (B, 64)
            features = torch.cat([features, ae_features], dim=1)  # (B, E + 64)
        return features.unsqueeze(1), reconstruction

    def question_tokens(self, question_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, H) RNN states at every step (the reference's ``forward_all``)."""
        words = self.word_embedding(question_ids)  # (B, L, D)
        if self.tfidf_embedding is not None:
            words = torch.cat([words, self.tfidf_embedding(question_ids)], dim=2)  # (B, L, 2D)
        states, _ = self.question_rnn(words)
        return states

    def forward(
        self, clip_pixels: torch.Tensor, ae_pixels: torch.Tensor | None, question_ids: torch.Tensor
    ) -> MedVQAOutput:
        visual, reconstruction = self.visual_tokens(clip_pixels, ae_pixels)
        joint = self.ban(visual, self.question_tokens(question_ids))  # (B, H)
        return MedVQAOutput(self.classifier(joint), reconstruction)


__all__ = ["MedVQAConfig", "MedVQAModel", "MedVQAOutput"]
