"""Zero-shot protocols as each system's own evaluation code runs them (``--protocol NAME``).

A protocol fixes what the reference fixes: the prompt templates, whether class names are changed
before they go into a prompt, whether the text embeddings are normalised, and which top-k are
reported. Data loading stays the user's (``polyclip.eval.data``); CLIP-RSICD's test split is read by
``read_rsicd_labels``.

- ``clip``: OpenAI CLIP / clip_benchmark (LAION-AI/CLIP_benchmark ``zeroshot_classification``): the 80
  ImageNet templates, each prompt embedding normalised, averaged and normalised again; top-1, top-5 and
  the mean per-class recall (balanced accuracy).
- ``clip-rsicd``: arampacha/CLIP-rsicd ``run_clip_eval.py``: "Aerial photograph of {}" with the class
  name as the file name's prefix; top-1/3/5/10 on the test split.
- ``plip`` / ``plip-tissue``: PathologyFoundation/plip ``_dataset_loader.py``: "An H&E image patch of {}."
  (Kather colon) and "An H&E image patch of {} tissue." (WSSS4LUAD, DigestPath, PanNuke); PLIP reports
  weighted F1.
- ``fashionclip``: patrickjohncyh/fashion-clip ``FashionCLIP.zero_shot_classification``: the raw label is
  the text, and the score is the normalised image embedding against the *unnormalised* text embedding
  (its ``_cosine_similarity`` normalises only the image side), so a label's text norm counts.
- ``bioclip``: Imageomics/pybioclip ``CustomLabelsClassifier``: labels stripped of surrounding spaces,
  the mean of OpenAI's 80 ImageNet templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from polyclip.eval.errors import EvalError


@dataclass(frozen=True)
class ZeroShotProtocol:
    templates: str  # built-in template set
    top_ks: tuple[int, ...] = (1, 5)
    underscores_to_spaces: bool = False  # the references put the class name in as given
    strip_names: bool = False  # pybioclip strips each label
    normalize_text: bool = True  # FashionCLIP scores against raw text embeddings
    reference: str = ""


ZERO_SHOT_PROTOCOLS = {
    "clip": ZeroShotProtocol("openai_imagenet", reference="LAION-AI/CLIP_benchmark zeroshot_classification"),
    "clip-rsicd": ZeroShotProtocol(
        "clip-rsicd", top_ks=(1, 3, 5, 10), reference="arampacha/CLIP-rsicd run_clip_eval.py"
    ),
    "plip": ZeroShotProtocol("plip", reference="PathologyFoundation/plip _dataset_loader.py (Kather)"),
    "plip-tissue": ZeroShotProtocol(
        "plip-tissue", reference="PathologyFoundation/plip _dataset_loader.py (WSSS4LUAD, DigestPath)"
    ),
    "fashionclip": ZeroShotProtocol(
        "fashionclip",
        normalize_text=False,
        reference="patrickjohncyh/fashion-clip FashionCLIP.zero_shot_classification",
    ),
    "bioclip": ZeroShotProtocol(
        "openai_imagenet", strip_names=True, reference="Imageomics/pybioclip CustomLabelsClassifier"
    ),
}


def zero_shot_protocol(name: str) -> ZeroShotProtocol:
    try:
        return ZERO_SHOT_PROTOCOLS[name]
    except KeyError:
        raise EvalError(
            f"unknown zero-shot protocol {name!r}; choose one of {', '.join(ZERO_SHOT_PROTOCOLS)}"
        ) from None
