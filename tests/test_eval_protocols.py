"""Each system's protocol against golden outputs of its own code (``scripts/golden/protocols.py``).

The references (clip_benchmark, PLIP's reproducibility code, CLIP-RSICD's ``run_clip_eval.py``,
FashionCLIP's ``zero_shot_classification``) ran their evaluation on the toy encoder of
``tests/golden/protocols/toy.py``; polyclip runs the same encoder on the same pixels, names and
captions here, through its public evaluation API.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polyclip.eval import (
    CaptionedImages,
    EncodeConfig,
    EvalModel,
    LabeledImages,
    ProbeConfig,
    RetrievalConfig,
    RunConfig,
    ZeroShotConfig,
    linear_probe,
    load_labeled,
    load_templates,
    run_retrieval,
    run_zero_shot,
)
from polyclip.eval.data import FileImages
from polyclip.tokenizers import ClipTokenizer

GOLDEN = Path(__file__).parent / "golden" / "protocols"
_spec = importlib.util.spec_from_file_location("protocol_toy", GOLDEN / "toy.py")
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)
RUN = RunConfig(encode=EncodeConfig(batch_size=8, num_workers=0))


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


class ToyModel(torch.nn.Module):
    """The golden's toy encoder behind polyclip's model contract."""

    def __init__(self, logit_scale: float = 4.0):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))
        self.logit_bias = None  # a softmax (CLIP) model
        self.config = SimpleNamespace(embed_dim=toy.EMBED_DIM, logit_scale_max=100.0)

    def encode_image(self, pixels, normalize=False):
        out = pixels.reshape(pixels.shape[0], -1).float()
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens, normalize=False):
        out = torch.from_numpy(toy.text_features(tokens.cpu().numpy()))
        return F.normalize(out, dim=-1) if normalize else out


def toy_preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(toy.image_features(np.asarray(image.convert("RGB"))))


def toy_eval_model() -> EvalModel:
    return EvalModel("toy", ToyModel(), toy_preprocess, ClipTokenizer())


def write_pngs(folder: Path, pixels, names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(pixels):
        path = folder / (names[index] if names else f"{index:03d}.png")
        Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- clip_benchmark


def test_zero_shot_equals_clip_benchmark(tmp_path):
    data = golden("clip_benchmark")["zeroshot"]
    dataset = LabeledImages(FileImages(write_pngs(tmp_path, data["pixels"])), data["labels"], data["classes"])
    config = ZeroShotConfig(templates=data["templates"], underscores_to_spaces=False)
    metrics = run_zero_shot([toy_eval_model()], dataset, config, RUN).results[0].metrics
    reference = data["metrics"]
    assert metrics["accuracy"] == pytest.approx(reference["acc1"], abs=1e-9)
    assert metrics["top5_accuracy"] == pytest.approx(reference["acc5"], abs=1e-9)
    assert metrics["balanced_accuracy"] == pytest.approx(reference["mean_per_class_recall"], abs=1e-9)


def test_retrieval_equals_clip_benchmark(tmp_path):
    data = golden("clip_benchmark")["retrieval"]
    captions = [text for texts in data["captions"] for text in texts]
    owner = [image for image, texts in enumerate(data["captions"]) for _ in texts]
    dataset = CaptionedImages(FileImages(write_pngs(tmp_path, data["pixels"])), captions, owner)
    metrics = run_retrieval([toy_eval_model()], dataset, RetrievalConfig(recall_ks=(1, 5, 10)), RUN)
    metrics = metrics.results[0].metrics
    for k in (1, 5, 10):  # clip_benchmark's values are float32 means
        assert metrics[f"t2i_R@{k}"] == pytest.approx(
            data["metrics"][f"image_retrieval_recall@{k}"], abs=1e-6
        )
        assert metrics[f"i2t_R@{k}"] == pytest.approx(data["metrics"][f"text_retrieval_recall@{k}"], abs=1e-6)


# ----------------------------------------------------------------------------- PLIP


def test_plip_probe_reports_every_alpha_as_the_reference():
    pytest.importorskip("sklearn")
    data = golden("plip")["probe"]
    model = ToyModel()
    features = {
        split: model.encode_image(
            torch.from_numpy(toy.image_features(np.array(data[f"{split}_pixels"], np.uint8)))
        )
        for split in ("train", "test")
    }
    result = linear_probe(
        features["train"],
        data["train_labels"],
        features["test"],
        data["test_labels"],
        4,
        ProbeConfig(protocol="plip"),
    )
    names = {
        "accuracy": "Accuracy",
        "macro_f1": "WF1",
        "macro_precision": "precision",
        "macro_recall": "recall",
    }
    names["mcc"] = "mcc"
    assert [str(alpha) for alpha in result.per_value] == list(data["per_alpha"])
    for alpha, splits in result.per_value.items():
        for split in ("test", "train"):
            for ours, theirs in names.items():
                assert splits[split][ours] == pytest.approx(
                    data["per_alpha"][str(alpha)][split][theirs], abs=1e-12
                )
    # The headline is the held-out choice, reported with the reference's model at that alpha.
    assert result.chosen in result.per_value
    assert result.metrics.macro_f1 == pytest.approx(
        result.per_value[result.chosen]["test"]["macro_f1"], abs=1e-12
    )
    summary = result.summary()
    assert summary[f"alpha={result.chosen:g}_test_macro_f1"] == pytest.approx(result.metrics.macro_f1)


def test_plip_prompts_are_the_references():
    prompts = golden("plip")["prompts"]
    for label, prompt in prompts["kather"].items():
        assert load_templates("plip")[0].format(label) == prompt
    for label, prompt in prompts["wsss4luad"].items():
        assert load_templates("plip-tissue")[0].format(label) == prompt


# ----------------------------------------------------------------------------- CLIP-RSICD


def rsicd_files(tmp_path: Path) -> tuple[Path, Path, dict]:
    data = golden("clip_rsicd")
    root = tmp_path / "RSICD_images"
    names = list(data["pixels"])
    write_pngs(root, [data["pixels"][n] for n in names], names)
    captions = tmp_path / "dataset_rsicd.json"
    captions.write_text(json.dumps(data["dataset"]))
    return captions, root, data


def test_rsicd_labels_are_read_as_the_reference(tmp_path):
    captions, root, data = rsicd_files(tmp_path)
    dataset = load_labeled(captions, image_root=root)
    assert dataset.class_names == data["class_names"] and len(dataset.class_names) == 30
    assert [p.name for p in dataset.images.paths] == data["eval_images"]
    assert [dataset.class_names[i] for i in dataset.labels] == [
        data["predictions"][n]["label"] for n in data["eval_images"]
    ]


def test_rsicd_protocol_equals_run_clip_eval(tmp_path):
    captions, root, data = rsicd_files(tmp_path)
    dataset = load_labeled(captions, image_root=root)
    config = ZeroShotConfig.for_protocol("clip-rsicd")
    assert config.top_ks == tuple(data["k_values"]) and load_templates(config.templates) == [
        "Aerial photograph of {}"
    ]
    metrics = run_zero_shot([toy_eval_model()], dataset, config, RUN).results[0].metrics
    ours = [metrics["accuracy"]] + [metrics[f"top{k}_accuracy"] for k in data["k_values"][1:]]
    assert ours == pytest.approx(data["scores"], abs=1e-12)


def test_rsicd_one_command(tmp_path, monkeypatch):
    """``polyclip eval zeroshot --data dataset_rsicd.json --image-root DIR --protocol clip-rsicd``."""
    from typer.testing import CliRunner

    import polyclip
    from polyclip.cli import app

    captions, root, data = rsicd_files(tmp_path)
    model = toy_eval_model()
    monkeypatch.setattr(
        polyclip, "load", lambda name, device=None: (model.model, model.preprocess, model.tokenizer)
    )
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["eval", "zeroshot", "--models", "clip-rsicd-v2", "--data", str(captions), "--image-root", str(root),
         "--protocol", "clip-rsicd", "--workers", "0", "--no-plots", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "results.json").read_text())["results"][0]["metrics"]
    assert [
        metrics["accuracy"],
        metrics["top3_accuracy"],
        metrics["top5_accuracy"],
        metrics["top10_accuracy"],
    ] == (pytest.approx(data["scores"], abs=1e-12))


# ----------------------------------------------------------------------------- FashionCLIP


def test_fashionclip_protocol_equals_zero_shot_classification(tmp_path):
    data = golden("fashionclip")
    labels = data["labels"]
    truth = [labels.index(name) for name in data["predicted"]]  # the reference's predictions as labels
    dataset = LabeledImages(FileImages(write_pngs(tmp_path, data["pixels"])), truth, labels)
    report = run_zero_shot([toy_eval_model()], dataset, ZeroShotConfig.for_protocol("fashionclip"), RUN)
    assert report.results[0].metrics["accuracy"] == 1.0  # every prediction is the reference's
    # Normalising the text side, as a cosine would, changes the answers: the protocol is not CLIP's.
    cosine = ZeroShotConfig(templates="fashionclip", underscores_to_spaces=False)
    assert run_zero_shot([toy_eval_model()], dataset, cosine, RUN).results[0].metrics["accuracy"] < 1.0


# ----------------------------------------------------------------------------- BioCLIP


def _bioclip_images():
    data = golden("bioclip")
    pixels = torch.from_numpy(toy.image_features(np.array(data["pixels"], np.uint8)))  # (B, E)
    return data, pixels


def _as_reference(path: tuple[str, ...], rank: str, taxon=None) -> dict:
    """A polyclip (path, probability) prediction in pybioclip's dict layout."""
    from polyclip.domains.taxonomy import RANKS

    keys = list(RANKS[: RANKS.index(rank) + 1])
    if rank != "species":
        return dict(zip(keys, path))
    out = dict(zip(keys[:-1], path[:-1]))
    out.update(species_epithet=path[-1], species=f"{path[-2]} {path[-1]}", common_name=taxon.common_name)
    return out


def test_bioclip_custom_labels_are_scored_as_pybioclip():
    from polyclip.domains.taxonomy import custom_labels_classifier

    data = golden("bioclip")
    model = ToyModel(data["logit_scale"])
    classifier = custom_labels_classifier(model, ClipTokenizer(), toy_preprocess, data["custom_labels"])
    torch.testing.assert_close(classifier.weights, torch.tensor(data["custom_weights"]), atol=1e-6, rtol=0)
    ours = classifier.top_k([Image.fromarray(np.array(p, np.uint8), "RGB") for p in data["pixels"]], k=3)
    reference = data["custom_predictions"]
    for image, row in enumerate(ours):
        theirs = [r for r in reference if r["file_name"] == str(image)]
        assert [label for label, _ in row] == [r["classification"] for r in theirs]
        assert [p for _, p in row] == pytest.approx([r["score"] for r in theirs], abs=1e-6)


def test_bioclip_tree_of_life_predicts_at_every_rank_as_pybioclip():
    from polyclip.domains.taxonomy import RANKS, TaxonomicClassifier, TreeOfLife

    data, pixels = _bioclip_images()
    tree = TreeOfLife.load(GOLDEN / "treeoflife" / "txt_emb_species.npy")
    assert len(tree.taxa) == 11 and tree.embeddings.shape == (11, toy.EMBED_DIM)
    classifier = TaxonomicClassifier.from_tree_of_life(ToyModel(data["logit_scale"]), toy_preprocess, tree)
    probabilities = classifier.probabilities_from_features(F.normalize(pixels, dim=-1))
    compared = 0
    for key, rows in data["treeoflife"].items():
        rank, min_prob = key.split("@")
        ours = classifier.rank(probabilities, rank, k=3, min_prob=float(min_prob))
        for image, reference in enumerate(rows):
            if reference is None:  # pybioclip fails when exactly one species passes min_prob
                assert rank != "species" and len(ours[image]) == 1
                continue
            taxa = {t.path(): t for t in tree.taxa}
            assert [_as_reference(path, rank, taxa.get(path)) for path, _ in ours[image]] == [
                {k: v for k, v in r.items() if k not in ("file_name", "score")} for r in reference
            ]
            assert [p for _, p in ours[image]] == pytest.approx([r["score"] for r in reference], abs=1e-6)
            compared += 1
    assert compared >= len(RANKS) * 6
    within = classifier.rank(
        classifier.probabilities_from_features(F.normalize(pixels, dim=-1), {"family": "Corvidae"}),
        "genus",
        k=3,
    )
    for image, row in enumerate(within):
        reference = [r for r in data["within_corvidae_genus"] if r["file_name"] == str(image)]
        assert [path[-1] for path, _ in row] == [r["genus"] for r in reference]
        assert [p for _, p in row] == pytest.approx([r["score"] for r in reference], abs=1e-6)


def test_tree_of_life_files_are_checked(tmp_path):
    from polyclip.domains.taxonomy import TaxonomyError, TreeOfLife

    np.save(tmp_path / "txt_emb_species.npy", np.zeros((11, 12), np.float32))  # not transposed
    (tmp_path / "txt_emb_species.json").write_text(
        (GOLDEN / "treeoflife" / "txt_emb_species.json").read_text()
    )
    with pytest.raises(TaxonomyError, match="one column per entry"):
        TreeOfLife.load(tmp_path / "txt_emb_species.npy")
    (tmp_path / "txt_emb_species.json").write_text('[["Animalia", "raven"]]')
    with pytest.raises(TaxonomyError, match="entry 0"):
        TreeOfLife.load(tmp_path / "txt_emb_species.npy")


def test_clip_rsicd_recipe_follows_run_clip_training_tv():
    from polyclip.train.recipes import get_recipe

    reference = golden("clip_rsicd")["training_recipe"]
    config = get_recipe("clip_rsicd")
    assert config.data.batch_size == reference["global_batch"]
    assert config.optim.lr == reference["lr"] and list(config.optim.betas) == reference["betas"]
    assert config.optim.weight_decay == reference["weight_decay"]
    assert (
        config.schedule.warmup_steps == reference["warmup_steps"]
        and config.schedule.epochs == reference["epochs"]
    )
    assert config.data.captions == "each" and reference["captions_per_image"] == 5  # RSICD has five per image
    assert config.precision == "bf16" and reference["dtype"] == "bfloat16"
