"""PubMedCLIP's MEVF model as its own code saves and runs it (``scripts/golden/medvqa.py``).

The golden folder holds a data folder written by the reference's own functions (``dictionary.pkl``,
``cache/trainval_ans2label.pkl``, a torch-saved ``WordEmbedding`` in ``embed_tfidf_weights.pkl``,
``pretrained_ae.pth``, GloVe rows, questions and images) and the logits of the reference ``BAN_Model``
whose every parameter came from ``toy.reference_state``; the test saves that state as the reference's
trainer does and loads it with ``MedVQA.from_reference``.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from polyclip.domains.medvqa import MedVQA, MedVQAConfigError, load_records
from polyclip.domains.medvqa.answers import AnswerVocabulary
from polyclip.domains.medvqa.reference import ReferenceData, read_plain_pickle, read_torch_saved_module

GOLDEN = Path(__file__).parent / "golden" / "protocols"
DATA = GOLDEN / "medvqa" / "data_RAD"
_spec = importlib.util.spec_from_file_location("protocol_toy", GOLDEN / "toy.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "medvqa" / "mevf.json").read_text())


@pytest.fixture(scope="module")
def reference_checkpoint(golden, tmp_path_factory) -> Path:
    """A file as the reference's ``utils.save_model`` writes it."""
    state = OrderedDict(
        (k, torch.from_numpy(v)) for k, v in toy.reference_state(golden["state_spec"]).items()
    )
    path = tmp_path_factory.mktemp("reference") / "model_epoch19.pth"
    torch.save(
        {"epoch": 19, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []}}, path
    )
    return path


def test_reference_data_folder_reads_as_published(golden):
    data = ReferenceData(DATA)
    words = data.words()
    assert words[-1] == words[len(words) - 1] and len(set(words)) == len(words)
    assert data.ans2label() == golden["ans2label"]
    embedding = data.tfidf_embedding()  # the torch-saved WordEmbedding module, read without running it
    assert sorted(embedding) == ["emb.weight", "emb_.weight"]
    assert embedding["emb.weight"].shape == (len(words) + 1, 300)
    assert torch.equal(embedding["emb.weight"][:-1], torch.from_numpy(data.glove()))
    assert data.autoencoder_path().name == "pretrained_ae.pth"


def test_pickles_that_name_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "dictionary.pkl"
    path.write_bytes(pickle.dumps([{"a": 0}, Evil()]))
    with pytest.raises(MedVQAConfigError, match="builtins.print"):
        read_plain_pickle(path)
    # In a torch-saved module every class is an inert record: the callable is never called.
    evil = tmp_path / "embed_tfidf_weights.pkl"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(MedVQAConfigError, match="does not hold a saved module"):
        read_torch_saved_module(evil)


def test_reference_checkpoint_gives_the_reference_logits(golden, reference_checkpoint):
    vqa = MedVQA.from_reference(reference_checkpoint, DATA)
    assert vqa.config.tfidf_embedding and vqa.config.question_input_dim == 600  # --op c
    records = load_records(DATA / "testset.json")
    images = [DATA / "images" / record.image_name for record in records]
    clip_pixels, ae_pixels, ids = vqa.inputs(images, [r.question for r in records])
    assert ids.tolist() == golden["question_ids"]
    assert float(clip_pixels.double().sum()) == pytest.approx(golden["clip_pixels_sum"], rel=1e-9)
    torch.testing.assert_close(
        clip_pixels.reshape(len(records), -1)[:, :8], torch.tensor(golden["clip_pixels_first"])
    )
    assert float(ae_pixels.double().sum()) == pytest.approx(golden["ae_pixels_sum"], rel=1e-9)
    with torch.no_grad():
        output = vqa.model(clip_pixels, ae_pixels, ids)
    torch.testing.assert_close(output.logits, torch.tensor(golden["logits"]), atol=1e-5, rtol=1e-5)
    assert float(output.reconstruction.double().sum()) == pytest.approx(golden["decoder_sum"], rel=1e-6)
    assert [vqa.answers.answer(int(i)) for i in output.logits.argmax(1)] == [
        answer.removesuffix("#") for answer in golden["predicted"]
    ]


def test_reference_checkpoint_is_loaded_strictly(golden, reference_checkpoint, tmp_path):
    data = torch.load(reference_checkpoint, weights_only=True)
    data["model_state"]["stray.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(data, broken)
    with pytest.raises(MedVQAConfigError, match="stray.weight"):
        MedVQA.from_reference(broken, DATA)


def test_evaluate_command_with_a_reference_checkpoint(golden, reference_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from polyclip.cli import app

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        ["medvqa", "evaluate", "--reference-checkpoint", str(reference_checkpoint), "--data", str(DATA),
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    predicted = [p["predicted"] for p in payload["predictions"]]
    assert predicted == [answer.removesuffix("#") for answer in golden["predicted"]]


def test_trainval_answers_are_the_references(golden):
    records = [*load_records(DATA / "trainset.json"), *load_records(DATA / "testset.json")]
    built = AnswerVocabulary.build(records)  # the paper's protocol: train + test answers
    published = AnswerVocabulary.from_ans2label(golden["ans2label"], records)
    assert built.entries == published.entries
