"""Medical visual question answering with a CLIP image tower, as PubMedCLIP evaluates it
("PubMedCLIP: How Much Does CLIP Benefit Visual Question Answering in the
Medical Domain?"; reference sarahESL/PubMedCLIP, folder MEVF_PubMedCLIP): MEVF's autoencoder +
CLIP image features, GloVe + LSTM question encoder, bilinear attention network, answer classifier.

    from polyclip.domains.medvqa import MedVQA, MedVQADataset, TrainConfig, load_records, train
    records = load_records("data_RAD/trainset.json")
    vqa = MedVQA.build("pubmedclip", records, word_vectors="glove.6B.300d.txt")
    dataset = MedVQADataset(records, "data_RAD/images", vqa.dictionary, vqa.answers, vqa.preprocess)
    train(vqa, dataset, config=TrainConfig())
    vqa.answer("image.jpg", "is there a fracture?")  # -> ("yes", 0.93)

The reference's own files: ``MedVQA.from_reference(checkpoint, "data_RAD")`` loads a model saved by
``MEVF_PubMedCLIP``'s trainer with its data folder (``reference.py``); ``qcr.QCR.from_reference`` the
paper's other model, QCR (question-type routing to closed and open branches).
"""

from polyclip.domains.medvqa.answers import AnswerVocabulary, normalize_answer
from polyclip.domains.medvqa.data import MedVQADataset, VQARecord, load_records
from polyclip.domains.medvqa.errors import MedVQAConfigError, MedVQADataError, MedVQAError, WordVectorError
from polyclip.domains.medvqa.metrics import AccuracyReport, accuracy_by_type, answer_scores, score_answers
from polyclip.domains.medvqa.model import MedVQAConfig, MedVQAModel, MedVQAOutput
from polyclip.domains.medvqa.pipeline import MedVQA
from polyclip.domains.medvqa.text import QuestionDictionary, load_word_vectors, tfidf_matrix, tokenize
from polyclip.domains.medvqa.train import (
    TrainConfig,
    TrainResult,
    evaluate,
    learning_rate,
    medvqa_loss,
    train,
)

__all__ = [
    "AccuracyReport",
    "AnswerVocabulary",
    "MedVQA",
    "MedVQAConfig",
    "MedVQAConfigError",
    "MedVQADataError",
    "MedVQADataset",
    "MedVQAError",
    "MedVQAModel",
    "MedVQAOutput",
    "QuestionDictionary",
    "TrainConfig",
    "TrainResult",
    "VQARecord",
    "WordVectorError",
    "accuracy_by_type",
    "answer_scores",
    "evaluate",
    "learning_rate",
    "load_records",
    "load_word_vectors",
    "medvqa_loss",
    "normalize_answer",
    "score_answers",
    "tfidf_matrix",
    "tokenize",
    "train",
]
