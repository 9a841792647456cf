"""Errors of the medical VQA module: each names the file, record or setting at fault."""

from __future__ import annotations


class MedVQAError(ValueError):
    """Base class: a user's input (data, word vectors, saved model, setting) cannot be used."""


class MedVQADataError(MedVQAError):
    """A question file is missing, is not valid JSON, or a record lacks a field or its image."""


class WordVectorError(MedVQAError):
    """A GloVe file cannot be read or does not fit the question dictionary."""


class MedVQAConfigError(MedVQAError):
    """A model or training setting is invalid, or a saved model folder is incomplete."""
