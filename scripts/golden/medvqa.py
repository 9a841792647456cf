"""Regenerate ``tests/golden/protocols/medvqa/``: PubMedCLIP's MEVF model run by its own code.

Run in an environment with torchvision, OpenAI's ``clip`` package, open_clip and pandas installed,
with a checkout of sarahESL/PubMedCLIP:

    python scripts/golden/medvqa.py PUBMEDCLIP_REPO [--out tests/golden/protocols/medvqa]

The reference's own functions build a VQA-RAD-style data folder from a few synthetic questions and
images (``Dictionary`` -> ``dictionary.pkl``; ``create_ans2label`` over train + test ->
``cache/trainval_ans2label.pkl``; ``tfidf_loading`` -> ``embed_tfidf_weights.pkl``, a torch-saved
``WordEmbedding``; an ``Auto_Encoder_Model`` state -> ``pretrained_ae.pth``), then ``build_BAN`` makes
the ``--clip --autoencoder --op c`` model with a tiny randomly initialised OpenAI CLIP (the released
weights are not needed: every parameter is then overwritten from numpy's seeded stream, see
``fill_state``, so the test can rebuild the same ``model_state`` without storing it). The model runs
on the reference's own inputs (``create_resized_images``'s 128x128 grey and 250x250 RGB arrays,
reshaped as ``test.py`` does) and its logits are stored.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import pickle
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[2] / "tests" / "golden" / "protocols"))
import toy  # noqa: E402

QUESTION_LEN = 12
HIDDEN = 32  # --num_hid, small so that the golden stays small (the reference runs use 1024)

RECORDS = {
    "train": [
        ("synpic100.jpg", "Is there a fracture in the left femur?", "yes", "CLOSED", "ABN"),
        ("synpic100.jpg", "What organ is shown?", "femur", "OPEN", "ORGAN"),
        ("synpic200.jpg", "Is the lung normal?", "no", "CLOSED", "ABN"),
        ("synpic200.jpg", "What is abnormal in the lung?", "mass", "OPEN", "ABN"),
        ("synpic300.jpg", "Is this an MRI?", "yes", "CLOSED", "MODALITY"),
        ("synpic300.jpg", "Which plane is this image taken in?", "axial", "OPEN", "PLANE"),
        ("synpic300.jpg", "Is there a mass?", "yes", "CLOSED", "PRES"),
        ("synpic200.jpg", "How many lesions are seen?", "2", "OPEN", "COUNT"),
    ],
    "test": [
        ("synpic100.jpg", "Is the femur fractured?", "yes", "CLOSED", "ABN"),
        ("synpic200.jpg", "What is seen in the lung's apex?", "mass", "OPEN", "PRES"),
        ("synpic300.jpg", "Is this a CT x ray?", "no", "CLOSED", "MODALITY"),
        ("synpic300.jpg", "Which organ has the lesion? -open", "brain", "OPEN", "ORGAN"),
        ("synpic100.jpg", "Is there any abnormality present?", "no", "CLOSED", "ABN"),
        ("synpic200.jpg", "Is a mass present, yes or no?", "mass", "OPEN", "PRES"),
    ],
}


def source_of(path: Path, *names: str) -> str:
    """The source of the named top-level classes/functions of a reference file."""
    text = path.read_text()
    tree = ast.parse(text)
    found = {node.name: ast.get_source_segment(text, node) for node in tree.body if hasattr(node, "name")}
    return "\n\n".join(found[name] for name in names)


def fill_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor from ``toy.reference_state`` (numpy's seeded stream), which the test repeats."""
    values = toy.reference_state([(key, list(tensor.shape)) for key, tensor in state.items()])
    return {key: torch.from_numpy(value) for key, value in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("repo", type=Path, help="sarahESL/PubMedCLIP checkout")
    parser.add_argument(
        "--out", type=Path, default=HERE.parents[2] / "tests" / "golden" / "protocols" / "medvqa"
    )
    args = parser.parse_args()
    repo, out = args.repo.resolve(), args.out.resolve()
    # The reference reads embed_tfidf_weights.pkl with a plain torch.load (full unpickling), as torch did
    # before 2.6; this trusted run does the same, the reason polyclip reads it with its own unpickler.
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    data = out / "data_RAD"
    if data.exists():
        shutil.rmtree(data)
    (data / "cache").mkdir(parents=True)
    (data / "images").mkdir()
    scratch = Path(tempfile.mkdtemp())
    shutil.copytree(repo / "MEVF_PubMedCLIP", scratch / "mevf")
    qcr = repo / "QCR_PubMedCLIP" / "lib"

    # --- question files and images
    for split, rows in RECORDS.items():
        records = [
            {"qid": f"{split}{i}", "image_name": image, "question": q, "answer": a, "answer_type": t,
             "question_type": qt, "phrase_type": "freeform"}
            for i, (image, q, a, t, qt) in enumerate(rows)
        ]  # fmt: skip
        (data / f"{split}set.json").write_text(json.dumps(records, indent=1))
    from PIL import Image

    rng = np.random.default_rng(11)
    for index, name in enumerate(sorted({r[0] for rows in RECORDS.values() for r in rows})):
        pixels = rng.integers(0, 256, (30 + 7 * index, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(data / "images" / name, quality=90)

    # --- the reference's helpers, executed from its sources
    shared = {"os": os, "json": json, "np": np, "torch": torch, "itertools": itertools, "cPickle": pickle}
    qcr_utils = types.SimpleNamespace()
    exec(source_of(qcr / "utils" / "utils.py", "create_glove_embedding_init"), shared)
    qcr_utils.create_glove_embedding_init = shared["create_glove_embedding_init"]
    shared["utils"] = qcr_utils
    exec(source_of(qcr / "dataset" / "dataset_RAD.py", "Dictionary", "tfidf_from_questions"), shared)
    Dictionary = shared["Dictionary"]
    dataset_rad = types.ModuleType("dataset_RAD")
    dataset_rad.Dictionary, dataset_rad.tfidf_from_questions = Dictionary, shared["tfidf_from_questions"]
    sys.modules["dataset_RAD"] = dataset_rad
    sys.modules["torch._six"] = types.SimpleNamespace(string_classes=str)

    dictionary = Dictionary()
    # create_dictionary.py adds the test questions too; tfidf_from_questions then sizes its sparse matrix
    # by the largest id in the training questions, which fails unless that is the last word, so the
    # dictionary here holds the training words (the test's other words are unknown: the last word).
    for row in RECORDS["train"]:
        dictionary.tokenize(row[1], True)
    dictionary.dump_to_file(str(data / "dictionary.pkl"))

    import pandas as pd

    class Frame(pd.DataFrame):  # the reference uses DataFrame.append, removed in pandas 2
        @property
        def _constructor(self):
            return Frame

        def append(self, other):
            return Frame(pd.concat([self, other], ignore_index=True))

    label_ns = {"os": os, "cPickle": pickle, "pd": pd}
    exec(source_of(qcr / "utils" / "create_label.py", "create_ans2label"), label_ns)
    frames = [Frame(json.loads((data / f"{s}set.json").read_text())) for s in ("train", "test")]
    label_ns["create_ans2label"](None, frames[0], frames[1], root=str(data))
    for unread in ("trainval_label2ans.pkl", "close_ans2label.pkl", "open_ans2label.pkl"):
        (data / "cache" / unread).unlink()  # close_ / open_label2ans.pkl stay: QCR reads them
    ans2label = pickle.loads((data / "cache" / "trainval_ans2label.pkl").read_bytes())

    glove = np.random.default_rng(12).standard_normal((len(dictionary), 300)).astype(np.float32)
    np.save(data / "glove6b_init_300d.npy", glove)
    (data / "glove").mkdir()
    (data / "glove" / "glove.6B.300d.txt").write_text("the " + " ".join(["0.1"] * 300) + "\n")

    sys.path.insert(0, str(scratch / "mevf"))
    import auto_encoder
    import base_model
    import clip
    import language_model
    import utils as mevf_utils

    torch.manual_seed(0)
    torch.save(auto_encoder.Auto_Encoder_Model().state_dict(), data / "pretrained_ae.pth")

    run = types.SimpleNamespace(
        op="c", gamma=2, num_hid=HIDDEN, rnn="LSTM", use_counter=False, maml=False, autoencoder=True,
        clip=True, clip_org=True, clip_vision_encoder="ViT-B/32", RAD_dir=str(data), SLAKE_dir=None,
        ae_model_path="pretrained_ae.pth", tfidf=True, use_RAD=True, activation="relu", dropout=0.5,
    )  # fmt: skip
    w_emb = language_model.WordEmbedding(dictionary.ntoken, 300, 0.0, "c")
    mevf_utils.tfidf_loading(True, w_emb, run)  # writes embed_tfidf_weights.pkl (torch.save of the module)
    shutil.rmtree(data / "glove")

    def tiny_clip(_name, jit=False):
        model = clip.model.CLIP(
            embed_dim=32, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
            context_length=77, vocab_size=100, transformer_width=64, transformer_heads=1, transformer_layers=1,
        )  # fmt: skip
        return model, None

    clip.load = tiny_clip
    dataset = types.SimpleNamespace(
        dictionary=dictionary, v_dim=32 + 64, num_ans_candidates=len(ans2label)
    )  # v_dim: CLIP embed + autoencoder code (--feat_dim_clip)
    model = base_model.build_BAN(dataset, run)
    state = model.state_dict()
    model.load_state_dict(fill_state(state), strict=True)
    model.eval()

    # The reference's inputs: create_resized_images.py arrays, test.py's reshapes, Dataset tokenisation.
    img_ns = {"np": np, "os": os, "json": json, "Image": Image, "pickle": pickle, "tqdm": lambda x: x}
    exec(source_of(qcr / "utils" / "create_resized_images.py", "imageresize"), img_ns)
    names = sorted({r[0] for rows in RECORDS.values() for r in rows})
    (scratch / "img2idx.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    arrays = {}
    for size, channels in ((128, 1), (250, 3)):
        target = scratch / f"images{size}.pkl"
        img_ns["imageresize"](
            str(scratch / "img2idx.json"), str(data / "images"), size, str(target), channels
        )
        arrays[size] = torch.from_numpy(pickle.loads(target.read_bytes())).float()
    tests = json.loads((data / "testset.json").read_text())
    index = [names.index(r["image_name"]) for r in tests]
    ae = arrays[128][index].reshape(len(tests), 128 * 128).reshape(len(tests), 128, 128).unsqueeze(1)
    clip_pixels = arrays[250][index].reshape(len(tests), 3 * 250 * 250).reshape(len(tests), 3, 250, 250)
    tokens = []
    for record in tests:
        ids = dictionary.tokenize(record["question"], False)[:QUESTION_LEN]
        tokens.append(ids + [dictionary.padding_idx] * (QUESTION_LEN - len(ids)))
    q = torch.tensor(tokens)
    with torch.no_grad():
        features, decoder = model([None, ae, clip_pixels], q)
        logits = model.classify(features)
    label2ans = {v: k for k, v in ans2label.items()}
    golden = {
        "state_spec": [[key, list(state[key].shape)] for key in sorted(state)],
        "hidden": HIDDEN,
        "question_ids": tokens,
        "logits": logits.tolist(),
        "predicted": [label2ans[int(i)] for i in logits.argmax(1)],
        "decoder_sum": float(decoder.double().sum()),
        "clip_pixels_sum": float(clip_pixels.double().sum()),
        "clip_pixels_first": clip_pixels.reshape(len(tests), -1)[:, :8].tolist(),
        "ae_pixels_sum": float(ae.double().sum()),
        "ans2label": ans2label,
    }
    (out / "mevf.json").write_text(json.dumps(golden, indent=1) + "\n")
    qcr_golden(repo, data, out, dictionary, ans2label, ae, clip_pixels, q)
    shutil.rmtree(scratch)
    print(f"wrote {out / 'mevf.json'}, {out / 'qcr.json'} and {data}")


def qcr_golden(repo, data, out, dictionary, ans2label, ae, clip_pixels, q) -> None:
    """QCR_PubMedCLIP's BAN_Model and classify_model, built from its sources, on the same inputs."""
    import clip
    from torch import nn
    from torch.nn import functional
    from torch.nn.init import kaiming_uniform_, xavier_uniform_
    from torch.nn.utils.weight_norm import weight_norm

    lib = repo / "QCR_PubMedCLIP" / "lib"
    namespace = {
        "torch": torch, "nn": nn, "F": functional, "np": np, "os": os, "weight_norm": weight_norm,
        "xavier_uniform_": xavier_uniform_, "kaiming_uniform_": kaiming_uniform_, "clip": clip,
        "Variable": torch.autograd.Variable,
    }  # fmt: skip
    for path, names in (
        (lib / "language" / "language_model.py", ("WordEmbedding", "QuestionEmbedding")),
        (lib / "network" / "connect.py", ("FCNet", "BCNet")),
        (repo / "QCR_PubMedCLIP" / "main" / "classifier.py", ("SimpleClassifier",)),
        (lib / "network" / "auto_encoder.py", ("Auto_Encoder_Model",)),
        (
            lib / "language" / "classify_question.py",
            ("linear", "QuestionAttention", "typeAttention", "classify_model"),
        ),
        (lib / "BAN" / "multi_level_model.py", ("BiAttention", "BiResNet", "seperate", "BAN_Model")),
    ):
        exec(source_of(path, *names), namespace)
    ns = types.SimpleNamespace
    cfg = ns(
        TRAIN=ns(
            QUESTION=ns(CAT=True, RNN="GRU", HID_DIM=1024, CLS_HID_DIM=1024, TFIDF=False),  # TFIDF: init only
            ATTENTION=ns(GLIMPSE=2, USE_COUNTER=False),
            VISION=ns(MAML=False, AUTOENCODER=True, AE_PATH="pretrained_ae.pth", CLIP=True, CLIP_ORG=True,
                      CLIP_VISION_ENCODER="ViT-B/32", OTHER_MODEL=False),  # fmt: skip
            ACTIVATION="relu", DROPOUT=0.5,
        ),
        DATASET=ns(DATA_DIR=str(data)),
    )  # fmt: skip
    close_answers = pickle.loads((data / "cache" / "close_label2ans.pkl").read_bytes())
    dataset = types.SimpleNamespace(
        dictionary=types.SimpleNamespace(ntoken=dictionary.ntoken), v_dim=32 + 64,
        num_close_candidates=len(close_answers), num_open_candidates=len(ans2label) - len(close_answers),
        num_ans_candidates=len(ans2label),
    )  # fmt: skip
    model = namespace["BAN_Model"](dataset, cfg, "cpu")
    state = model.state_dict()
    model.load_state_dict(fill_state(state), strict=True)
    glove = str(data / "glove6b_init_300d.npy")
    type_model = namespace["classify_model"](dictionary.ntoken, glove)
    type_state = type_model.state_dict()
    type_model.load_state_dict(fill_state(type_state), strict=True)
    model.eval()
    type_model.eval()
    answers = torch.zeros(q.shape[0], len(ans2label))
    # The type networks drop out at test time (see polyclip's qcr.py), so a seed fixes the run. With random
    # weights every question would take one branch; the type classifier's last bias is moved so that the
    # median question sits on the boundary, under the same dropout draws (typeatt's first, then its own).
    seed = 2024
    torch.manual_seed(seed)
    with torch.no_grad():
        model.typeatt([q])
        logits = type_model([q])
    margin = logits[:, 1] - logits[:, 0]
    bias = type_model.f_fc3.bias.detach().clone()
    bias[1] -= float(margin.median()) + 1e-3
    with torch.no_grad():
        type_model.f_fc3.bias.copy_(bias)
    torch.manual_seed(seed)
    with torch.no_grad():
        close_out, open_out, _, _, decoder, index_open, index_close = model.forward_classify(
            [None, ae, clip_pixels], [q], answers, type_model, len(close_answers)
        )
        close_logits, open_logits = model.classify(close_out, open_out)
    golden = {
        "state_spec": [[key, list(state[key].shape)] for key in sorted(state)],
        "type_state_spec": [[key, list(type_state[key].shape)] for key in sorted(type_state)],
        "seed": seed,
        "type_f_fc3_bias": bias.tolist(),
        "index_open": index_open,
        "index_close": index_close,
        "close_logits": close_logits.tolist(),
        "open_logits": open_logits.tolist(),
        "decoder_sum": float(decoder.double().sum()),
        "num_closed": len(close_answers),
    }
    (out / "qcr.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
