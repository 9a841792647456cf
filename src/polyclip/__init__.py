"""polyclip: one toolkit for CLIP and the models built on it."""

__version__ = "0.1.0"
