"""polyclip: one toolkit for CLIP and the models built on it.

model, preprocess, tokenizer = polyclip.load("clip-vit-b-32")
classifier = polyclip.zero_shot_classifier(model, tokenizer, ["cat", "dog"], preprocess=preprocess)
probs = classifier.predict([image])

model, preprocess, tokenizer = polyclip.create_model_and_transforms("ViT-B-32")  # random weights
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public face, imported on first use so that `import polyclip` (and its subpackages) stay light.
_EXPORTS = {
    "load": "polyclip.factory",
    "save": "polyclip.factory",
    "create_model": "polyclip.factory",
    "create_model_and_transforms": "polyclip.factory",
    "list_models": "polyclip.hub",
    "list_architectures": "polyclip.models",
    "zero_shot_classifier": "polyclip.zero_shot",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'polyclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
