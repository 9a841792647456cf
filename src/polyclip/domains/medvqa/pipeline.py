"""A medical VQA system in one object: the model, the question dictionary, the answer vocabulary and
the CLIP tower's preprocessing; built from a CLIP checkpoint and training questions, saved to and
loaded from a folder, and asked questions with ``answer(image, question) -> (answer, score)``.

Saved folder: ``medvqa.json`` (model config incl. the CLIP tower's architecture, preprocessing,
dictionary words, answer entries) and ``model.safetensors`` (all weights, the fine-tuned CLIP tower
included), so loading needs neither the CLIP checkpoint nor the word vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import polyclip
from polyclip.domains.medvqa.answers import AnswerVocabulary
from polyclip.domains.medvqa.autoencoder import load_autoencoder_weights
from polyclip.domains.medvqa.data import MedVQADataset, VQARecord, image_inputs
from polyclip.domains.medvqa.errors import MedVQAConfigError
from polyclip.domains.medvqa.model import MedVQAConfig, MedVQAModel
from polyclip.domains.medvqa.text import QuestionDictionary, load_word_vectors, tfidf_matrix
from polyclip.images import ImageSource
from polyclip.transforms import PRESETS, ImageTransform, build_preprocess

FORMAT = "polyclip-medvqa"
FORMAT_VERSION = 1
CONFIG_FILE = "medvqa.json"
WEIGHTS_FILE = "model.safetensors"


class MedVQA:
    def __init__(
        self,
        model: MedVQAModel,
        dictionary: QuestionDictionary,
        answers: AnswerVocabulary,
        preprocess: ImageTransform,
    ):
        if len(dictionary) != model.config.vocab_size or len(answers) != model.config.num_answers:
            raise MedVQAConfigError(
                f"the model expects {model.config.vocab_size} words and {model.config.num_answers} answers; "
                f"got {len(dictionary)} and {len(answers)}"
            )
        self.model = model
        self.dictionary = dictionary
        self.answers = answers
        self.preprocess = preprocess

    @property
    def config(self) -> MedVQAConfig:
        return self.model.config

    @classmethod
    def build(
        cls,
        clip: str | os.PathLike | tuple[Any, ImageTransform],
        train_records: Sequence[VQARecord],
        word_vectors: str | os.PathLike | np.ndarray | None = None,
        autoencoder_weights: str | os.PathLike | None = None,
        dictionary: QuestionDictionary | None = None,
        preprocess: str | None = None,
        answer_records: Sequence[VQARecord] | None = None,
        **options: Any,
    ) -> MedVQA:
        """A new system for ``train_records``.

        Args:
            clip: a name or path for ``polyclip.load`` (``"pubmedclip"``, a PubMedCLIP ``.pth`` file...),
                or an already loaded ``(dual encoder, preprocess)`` pair; its image tower is used.
            train_records: the training questions: they give the dictionary, the answer vocabulary and
                (with ``tfidf_embedding=True``) the tf-idf matrix.
            word_vectors: a GloVe text file (or a dictionary-aligned ``.npy``) or an (N, D) array; None
                keeps random embeddings.
            autoencoder_weights: MEVF's ``pretrained_ae.pth`` to start the autoencoder from.
            dictionary: a fixed question dictionary instead of one built from ``train_records``.
            preprocess: a preset of ``polyclip.transforms.PRESETS`` for the CLIP tower instead of the
                checkpoint's (a local PubMedCLIP ``.pth`` file records none, so it reads as OpenAI CLIP's;
                ``"pubmedclip"`` gives PubMedCLIP's own resize 256 / crop 224 / ImageNet statistics).
            answer_records: the records the answer vocabulary is built from; None: ``train_records``. The
                paper's protocol (the reference's ``trainval_ans2label.pkl``) is train + test records.
            options: other `MedVQAConfig` fields (``hidden_dim``, ``rnn``, ``tfidf_embedding``...); the
                reference's ``main.py`` defaults (``--op c``: the 600-d GloVe + tf-idf input) are
                ``MedVQAConfig``'s.
        """
        if not train_records:
            raise MedVQAConfigError("no training records")
        if isinstance(clip, tuple):
            clip_model, transform = clip
        else:
            clip_model, transform, _ = polyclip.load(clip)
        if preprocess is not None:
            if preprocess not in PRESETS:
                raise MedVQAConfigError(
                    f"unknown preprocessing preset {preprocess!r}; known: {', '.join(PRESETS)}"
                )
            size = clip_model.config.vision.image_size
            transform = build_preprocess(PRESETS[preprocess].to_dict() | {"image_size": size})
        questions = [record.question for record in train_records]
        dictionary = dictionary or QuestionDictionary.build(questions)
        answers = AnswerVocabulary.build(answer_records if answer_records is not None else train_records)
        vectors = None
        if word_vectors is not None:
            vectors = (
                np.asarray(word_vectors, dtype=np.float32)
                if isinstance(word_vectors, np.ndarray)
                else load_word_vectors(word_vectors, dictionary)[0]
            )
            options.setdefault("word_dim", int(vectors.shape[1]))
        reserved = {"num_answers", "vocab_size", "clip"} & set(options)
        if reserved:
            raise MedVQAConfigError(f"{sorted(reserved)} come from the data and the CLIP model, not options")
        config = MedVQAConfig.from_dict(
            dict(
                options,
                num_answers=len(answers),
                vocab_size=len(dictionary),
                clip=clip_model.config.to_dict(),
            )
        )
        model = MedVQAModel(config, clip_visual=clip_model.visual.float())
        if vectors is not None:
            tfidf = tfidf_matrix(questions, dictionary) if config.tfidf_embedding else None
            model.init_word_embeddings(vectors, tfidf)
        elif config.tfidf_embedding:
            raise MedVQAConfigError(
                "the tf-idf embedding (the reference's --op c) is built from word vectors: pass word_vectors, "
                "or tfidf_embedding=False for the 300-d input"
            )
        if autoencoder_weights is not None:
            if model.autoencoder is None:
                raise MedVQAConfigError(
                    "autoencoder weights given but the model has no autoencoder (autoencoder=False)"
                )
            load_autoencoder_weights(model.autoencoder, autoencoder_weights)
        return cls(model, dictionary, answers, transform)

    @classmethod
    def from_reference(
        cls,
        checkpoint: str | os.PathLike,
        data_dir: str | os.PathLike,
        clip_input_size: int | None = None,
    ) -> MedVQA:
        """A model saved by the reference trainer (``{"epoch", "model_state", "optimizer_state"}`` of
        ``MEVF_PubMedCLIP``'s ``BAN_Model``, ``--clip --autoencoder``), loaded strictly, with the dictionary
        and answers of its data folder (``reference.ReferenceData``) and the reference's own CLIP input
        (250x250, 288 for RN50x4; ``clip_input_size`` overrides). Every key of the checkpoint is used
        except the CLIP text tower's, which the VQA model never runs."""
        from polyclip.domains.medvqa.data import load_records
        from polyclip.domains.medvqa.reference import (
            REFERENCE_CLIP_SIZE,
            ReferenceClipPixels,
            ReferenceData,
            clip_tower_from_state,
            read_reference_checkpoint,
            reference_key_map,
            split_clip_state,
        )

        state, _epoch = read_reference_checkpoint(checkpoint)
        data = ReferenceData(data_dir)
        words, ans2label = data.words(), data.ans2label()
        clip_state, rest = split_clip_state(state)
        clip_model = clip_tower_from_state(clip_state)
        try:
            embedding = rest["w_emb.emb.weight"]
            rnn_ih, rnn_hh = rest["q_emb.rnn.weight_ih_l0"], rest["q_emb.rnn.weight_hh_l0"]
            h_mat = rest.pop("v_att.logits.h_mat_v")
            h_mat_g, h_bias = rest.pop("v_att.logits.h_mat_g"), rest.pop("v_att.logits.h_bias")
            num_answers = rest["classifier.main.3.weight_v"].shape[0]
        except KeyError as error:
            raise MedVQAConfigError(
                f"{checkpoint} is not a reference BAN model (no {error.args[0]}); SAN models are not read"
            ) from None
        hidden = rnn_hh.shape[1]
        glimpses = h_mat.shape[1]
        tfidf = "w_emb.emb_.weight" in rest
        if embedding.shape[0] - 1 != len(words) or num_answers != len(ans2label):
            raise MedVQAConfigError(
                f"{checkpoint} has {embedding.shape[0] - 1} words and {num_answers} answers; {data_dir} has "
                f"{len(words)} and {len(ans2label)}: it is not the data folder the model was trained on"
            )
        config = MedVQAConfig(
            num_answers=num_answers, vocab_size=len(words), clip=clip_model.config.to_dict(),
            word_dim=embedding.shape[1], tfidf_embedding=tfidf, rnn="lstm" if rnn_ih.shape[0] == 4 * hidden else "gru",
            hidden_dim=hidden, glimpses=glimpses, attention_k=h_mat.shape[-1] // hidden,
            question_length=12, autoencoder="convert.weight" in rest,
        )  # fmt: skip
        model = MedVQAModel(config, clip_visual=clip_model.visual.float())
        mapped = {k: v for k, v in model.state_dict().items() if k.startswith("clip_visual.")}
        missing = []
        for ours, theirs in reference_key_map(glimpses, tfidf, config.autoencoder).items():
            if theirs in rest:
                mapped[ours] = rest.pop(theirs)
            else:
                missing.append(theirs)
        mapped["ban.attention.projection_v"] = h_mat.reshape(glimpses, -1)  # (1, G, 1, kH) -> (G, kH)
        mapped["ban.attention.projection_g"] = h_mat_g.reshape(())
        mapped["ban.attention.bias"] = h_bias.reshape(glimpses)  # (1, G, 1, 1) -> (G,)
        if missing or rest:
            raise MedVQAConfigError(
                f"{checkpoint} does not fit the reference BAN model: missing {missing[:5]}, "
                f"unexpected {sorted(rest)[:5]}"
            )
        try:
            model.load_state_dict(mapped, strict=True)
        except RuntimeError as error:
            raise MedVQAConfigError(f"{checkpoint}: {error}") from None
        records = [record for path in data.question_files() for record in load_records(path, language=None)]
        answers = AnswerVocabulary.from_ans2label(ans2label, records)
        if clip_input_size is None:
            clip_input_size = 288 if config.clip_config.vision.image_size == 288 else REFERENCE_CLIP_SIZE
        return cls(model.eval(), QuestionDictionary(words), answers, ReferenceClipPixels(clip_input_size))

    # -----------------------------------------------------------------------------------------------
    def dataset(self, records: Sequence[VQARecord], image_root: str | os.PathLike) -> MedVQADataset:
        """The records as model inputs and targets, with this system's dictionary, answers and sizes."""
        return MedVQADataset(
            records, image_root, self.dictionary, self.answers, self.preprocess,
            self.config.autoencoder_size, self.config.question_length,
        )  # fmt: skip

    # inference

    def inputs(
        self, images: Sequence[ImageSource], questions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images and questions -> (CLIP pixels (B, 3, S, S), grey pixels (B, 1, s, s), ids (B, L))."""
        if len(images) != len(questions):
            raise MedVQAConfigError(f"{len(images)} images for {len(questions)} questions")
        pairs = [image_inputs(image, self.preprocess, self.config.autoencoder_size) for image in images]
        ids = self.dictionary.encode_batch(list(questions), self.config.question_length)
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), ids

    @torch.no_grad()
    def answer_batch(
        self, images: Sequence[ImageSource], questions: Sequence[str]
    ) -> list[tuple[str, float]]:
        """The best answer per (image, question) and its sigmoid score (the model's BCE probability)."""
        if not images:
            return []
        self.model.eval()
        clip_pixels, ae_pixels, ids = self.inputs(images, questions)
        device = self.model.device
        logits = self.model(clip_pixels.to(device), ae_pixels.to(device), ids.to(device)).logits
        scores, labels = logits.sigmoid().max(dim=1)
        return [(self.answers.answer(int(label)), float(score)) for label, score in zip(labels, scores)]

    def answer(self, image: ImageSource, question: str) -> tuple[str, float]:
        """``(answer, score)`` for one image (path, bytes or PIL image) and one question."""
        if not isinstance(question, str) or not question.strip():
            raise MedVQAConfigError("the question must be non-empty text")
        return self.answer_batch([image], [question])[0]

    def to(self, device: str | torch.device) -> MedVQA:
        self.model.to(device)
        return self

    # -----------------------------------------------------------------------------------------------
    # folders

    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.config.to_dict(),
            "preprocess": self.preprocess.config.to_dict(),
            "dictionary": self.dictionary.to_json(),
            "answers": self.answers.to_json(),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> MedVQA:
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise MedVQAConfigError(f"{directory} is not a saved medvqa model: {path.name} is missing")
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MedVQAConfigError(f"{config_path} is not valid JSON: {error}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise MedVQAConfigError(f"{config_path} is not a {FORMAT} file")
        if meta.get("version") != FORMAT_VERSION:
            raise MedVQAConfigError(
                f"{config_path} has version {meta.get('version')}; this reader knows {FORMAT_VERSION}"
            )
        config = MedVQAConfig.from_dict(meta["model"])
        with torch.device("meta"):
            model = MedVQAModel(config)
        state = load_file(str(weights_path))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise MedVQAConfigError(
                f"{weights_path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.load_state_dict(state, strict=True, assign=True)
        vqa = cls(
            model.eval(),
            QuestionDictionary.from_json(meta["dictionary"]),
            AnswerVocabulary.from_json(meta["answers"]),
            _preprocess_from_dict(meta["preprocess"]),
        )
        return vqa.to(device or "cpu")


def _preprocess_from_dict(data: dict):
    if data.get("kind") == "pubmedclip-reference":  # the reference's own CLIP input (from_reference)
        from polyclip.domains.medvqa.reference import ReferenceClipPixels

        return ReferenceClipPixels(int(data["size"]))
    return build_preprocess(data)


__all__ = ["MedVQA"]
