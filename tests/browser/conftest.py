"""Fixtures of the browser tests; the helpers are in browser_support.py."""

from browser_support import collection, tiny_encoder, tiny_model_dir  # noqa: F401
