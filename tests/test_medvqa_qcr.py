"""QCR_PubMedCLIP's model as its own code runs it (``scripts/golden/medvqa.py``, ``qcr_golden``).

Both reference networks (``BAN_Model`` with the closed and open branches, and the question-type
``classify_model``) got every parameter from ``toy.reference_state``; their test path
(``forward_classify`` + ``classify``) ran after ``torch.manual_seed(seed)``, since the reference's type
networks drop out at test time. The same seed here must give the same routing and logits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from polyclip.domains.medvqa import load_records
from polyclip.domains.medvqa.data import autoencoder_pixels
from polyclip.domains.medvqa.errors import MedVQAConfigError
from polyclip.domains.medvqa.qcr import qcr_from_reference_state, type_classifier_from_reference_state
from polyclip.domains.medvqa.reference import ReferenceClipPixels, ReferenceData
from polyclip.domains.medvqa.text import QuestionDictionary
from polyclip.images import load_image

GOLDEN = Path(__file__).parent / "golden" / "protocols"
DATA = GOLDEN / "medvqa" / "data_RAD"
_spec = importlib.util.spec_from_file_location("protocol_toy", GOLDEN / "toy.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _state(spec) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in toy.reference_state(spec).items()}


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "medvqa" / "qcr.json").read_text())


@pytest.fixture(scope="module")
def states(golden) -> tuple[dict, dict]:
    """(the QCR model's reference state, the type classifier's), regenerated once."""
    type_state = _state(golden["type_state_spec"])
    type_state["f_fc3.bias"] = torch.tensor(golden["type_f_fc3_bias"])  # moved so both branches are taken
    return _state(golden["state_spec"]), type_state


def test_qcr_reference_model_gives_the_reference_logits(golden, states):
    words = ReferenceData(DATA).words()
    model = qcr_from_reference_state(dict(states[0]), golden["num_closed"])
    type_net = type_classifier_from_reference_state(dict(states[1]), len(words))
    records = load_records(DATA / "testset.json")
    images = [load_image(DATA / "images" / r.image_name) for r in records]
    clip_pixels = torch.stack([ReferenceClipPixels()(image) for image in images])
    ae_pixels = torch.stack([autoencoder_pixels(image, 128) for image in images])
    ids = QuestionDictionary(words).encode_batch([r.question for r in records], 12)
    torch.manual_seed(golden["seed"])
    with torch.no_grad():
        output = model(clip_pixels, ae_pixels, ids, type_classifier=type_net)
    assert output.is_open.nonzero().squeeze(1).tolist() == golden["index_open"]
    assert (~output.is_open).nonzero().squeeze(1).tolist() == golden["index_close"]
    torch.testing.assert_close(
        output.closed_logits, torch.tensor(golden["close_logits"]), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(output.open_logits, torch.tensor(golden["open_logits"]), atol=1e-4, rtol=1e-4)
    assert float(output.reconstruction.double().sum()) == pytest.approx(golden["decoder_sum"], rel=1e-6)


def test_qcr_reference_state_is_loaded_strictly(golden, states):
    state = dict(states[0])
    state["stray.weight"] = torch.zeros(1)
    with pytest.raises(MedVQAConfigError, match="stray.weight"):
        qcr_from_reference_state(state, golden["num_closed"])


def test_qcr_from_reference_files_answers_with_the_routed_branch(golden, states, tmp_path):
    from polyclip.domains.medvqa.qcr import QCR
    from polyclip.domains.medvqa.reference import read_plain_pickle

    torch.save({"epoch": 199, "model_state": states[0]}, tmp_path / "model.pth")
    torch.save(states[1], tmp_path / "type_classifier.pth")  # VQA-RAD's: a plain state dict
    qcr = QCR.from_reference(tmp_path / "model.pth", tmp_path / "type_classifier.pth", DATA)
    records = load_records(DATA / "testset.json")
    torch.manual_seed(golden["seed"])
    answers = qcr.answer_batch(
        [DATA / "images" / r.image_name for r in records], [r.question for r in records]
    )
    closed = read_plain_pickle(DATA / "cache" / "close_label2ans.pkl")
    opened = read_plain_pickle(DATA / "cache" / "open_label2ans.pkl")
    expected = {}
    for row, index in enumerate(golden["index_close"]):
        expected[index] = (
            closed[max(range(len(closed)), key=golden["close_logits"][row].__getitem__)],
            "CLOSED",
        )
    for row, index in enumerate(golden["index_open"]):
        best = max(range(len(opened)), key=golden["open_logits"][row].__getitem__)
        expected[index] = (opened[best].removesuffix("#"), "OPEN")
    assert answers == [expected[i] for i in range(len(records))]
