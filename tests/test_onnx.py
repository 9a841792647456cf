"""ONNX export: graphs run by onnxruntime equal polyclip's eager towers, and the exported folder loads
through ``polyclip.load`` as an inference-only model that zero-shot and ``polyclip embed`` accept.

Each of the three tower kinds (CLIP ViT, ModifiedResNet, SigLIP ViT with MAP head and bidirectional
text) is exported once per module; the exporter takes a few seconds per graph.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import polyclip
from polyclip.checkpoints import CheckpointError, detect_format, read_checkpoint
from polyclip.cli import app
from polyclip.factory import default_preprocess
from polyclip.tokenizers import build_tokenizer
from polyclip.transforms import build_preprocess

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import SELF_SCORE_TOLERANCE  # noqa: E402
from polyclip.onnx import MANIFEST_NAME, OnnxDualEncoder, OnnxFolderError, export_onnx  # noqa: E402

runner = CliRunner()
TOLERANCE = 1e-4  # max |onnx - eager| / max |eager|, fp32
PROMPTS = ["a photo of a cat", "a diagram", "satellite image of a harbour with many small boats", "x", ""]


def _one_layer(arch: str) -> torch.nn.Module:
    """The tiny architecture with one block per transformer: the exporter's time grows with the ops."""
    config = polyclip.models.get_architecture(arch)
    if config.vision.kind == "vit":
        config.vision = dataclasses.replace(config.vision, layers=1)
    config.text = dataclasses.replace(config.text, layers=1)
    torch.manual_seed(0)
    model = polyclip.create_model(config).eval()
    with torch.no_grad():  # nonzero BatchNorm statistics and residual scales, so every op matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def _siglip_tokenizer(folder):
    """A real SentencePiece model with SigLIP's special ids (<pad>=0, </s>=1, <unk>=2)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = (
        "photo picture cat dog bird car street road harbour boat diagram satellite image small many".split()
    )
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(500)]
    folder.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(folder / "spiece"), model_type="unigram",
        vocab_size=60, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2,
    )  # fmt: skip
    return build_tokenizer(
        {"type": "siglip", "spiece_model": str(folder / "spiece.model"), "context_length": 64}
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{kind: (eager model, preprocess, tokenizer, export folder)}; the ViT goes through the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the exporter traces in Python; two threads of tiny ops only contend
    clip_tokenizer = build_tokenizer({"type": "clip", "context_length": 77})
    made = {}
    for kind, arch in (("vit", "tiny-vit"), ("resnet", "tiny-resnet"), ("siglip", "tiny-siglip")):
        model = _one_layer(arch)
        preprocess = build_preprocess(default_preprocess(model.config))
        tokenizer = _siglip_tokenizer(root / "spm") if kind == "siglip" else clip_tokenizer
        out = root / f"{kind}-onnx"
        if kind == "vit":
            native = polyclip.save(model, preprocess, tokenizer, root / "vit-native")
            result = runner.invoke(app, ["export-onnx", str(native), "--out", str(out)])
            assert result.exit_code == 0, result.output
            assert "opset 20" in result.output
        else:
            export_onnx(model, preprocess, tokenizer, out)
        made[kind] = (model, preprocess, tokenizer, out)
    torch.set_num_threads(threads)
    return made


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("kind", ["vit", "resnet", "siglip"])
def test_onnxruntime_equals_eager(exports, kind):
    model, _, tokenizer, folder = exports[kind]
    loaded, preprocess, loaded_tokenizer = polyclip.load(folder)
    assert isinstance(loaded, OnnxDualEncoder) and detect_format(folder) == "onnx"
    assert loaded_tokenizer(PROMPTS).equal(tokenizer(PROMPTS))
    assert preprocess.config == build_preprocess(default_preprocess(model.config)).config
    size = model.image_size
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 5):  # exported at batch 2: the batch is dynamic
        pixels = torch.randn(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            assert _relative(loaded.encode_image(pixels), model.encode_image(pixels)) <= TOLERANCE
    tokens = tokenizer(PROMPTS)  # prompts of several lengths
    for rows in (tokens[:1], tokens):
        with torch.no_grad():
            assert _relative(loaded.encode_text(rows), model.encode_text(rows)) <= TOLERANCE
    pixels = torch.randn(3, 3, size, size, generator=generator)
    with torch.no_grad():
        want, got = model(pixels, tokens), loaded(pixels, tokens)
    assert _relative(got.logits_per_image, want.logits_per_image) <= TOLERANCE
    assert got.logits_per_text.shape == (len(PROMPTS), 3)


@pytest.mark.parametrize("kind", ["vit", "siglip"])
def test_manifest_states_opset_and_dynamic_axes(exports, kind):
    model, _, tokenizer, folder = exports[kind]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["opset"] == 20 and manifest["format"] == "polyclip-onnx"
    assert manifest["tokenizer"] == tokenizer.save(folder / "copy")  # the record polyclip.save writes
    graph = onnx.load(str(folder / "text.onnx"), load_external_data=False)
    assert next(o.version for o in graph.opset_import if o.domain == "") == 20
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # symbolic batch
    causal = model.config.text.causal
    assert bool(dims[1].dim_param) is causal and manifest["graphs"]["text"]["dynamic_length"] is causal
    if not causal:
        assert dims[1].dim_value == 64
        assert (folder / "spiece.model").is_file()  # the tokenizer's own file beside the graphs
        loaded, _, _ = polyclip.load(folder)
        with pytest.raises(ValueError, match="exactly 64 tokens"):
            loaded.encode_text(tokenizer(PROMPTS)[:, :10])
    image_dims = onnx.load(str(folder / "image.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert image_dims[0].dim_param
    assert [d.dim_value for d in image_dims[1:]] == [3, model.image_size, model.image_size]


def _shapes(folder, count=6):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (48, 40), (30 * i, 200 - 25 * i, 90))
        image.paste((255, 255, 255), (4 * i, 5, 4 * i + 12, 20))
        paths.append(folder / f"img{i}.png")
        image.save(paths[-1])
    return paths


def test_zero_shot_through_onnx_equals_eager(exports, tmp_path):
    model, preprocess, tokenizer, folder = exports["vit"]
    loaded, loaded_preprocess, loaded_tokenizer = polyclip.load(folder)
    images = _shapes(tmp_path / "images")
    names = ["square", "circle", "triangle"]
    eager = polyclip.zero_shot_classifier(model, tokenizer, names, preprocess=preprocess).predict(images)
    onnx_probs = polyclip.zero_shot_classifier(
        loaded, loaded_tokenizer, names, preprocess=loaded_preprocess
    ).predict(images)
    assert torch.allclose(torch.as_tensor(onnx_probs), torch.as_tensor(eager), atol=1e-5)


def test_embed_command_through_onnx(exports, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    model, preprocess, _, folder = exports["siglip"]
    paths = _shapes(tmp_path / "images", 5)
    out = tmp_path / "emb.parquet"
    result = runner.invoke(
        app, ["embed", str(tmp_path / "images"), "--model", str(folder), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    got = dict(zip(table.column("path").to_pylist(), table.column("embedding").to_pylist()))
    with torch.no_grad():
        want = model.encode_image(torch.stack([preprocess(p) for p in paths]), normalize=True)
    for path, row in zip(paths, want):
        assert _relative(torch.tensor(got[str(path)]), row) <= TOLERANCE


def test_inference_only_and_clear_errors(exports, tmp_path):
    _, _, _, folder = exports["resnet"]
    loaded, _, _ = polyclip.load(folder)
    assert not loaded.training and loaded.eval() is loaded
    with pytest.raises(NotImplementedError, match="inference only"):
        loaded.train()
    with pytest.raises(NotImplementedError, match="inference only"):
        loaded.set_grad_checkpointing(True)
    with pytest.raises(NotImplementedError, match="CPU in float32"):
        loaded.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        polyclip.load(folder, dtype="bf16")
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, 64, 64\)"):
        loaded.encode_image(torch.zeros(1, 3, 32, 32))
    assert loaded.encode_image(torch.zeros(0, 3, 64, 64)).shape == (0, 32)
    with pytest.raises(CheckpointError, match="ONNX graphs, not weights"):
        read_checkpoint(folder)
    # two exports never share a fingerprint: the state dict carries the graphs' digests
    other, _, _ = polyclip.load(exports["vit"][3])
    assert not loaded.state_dict()["graph_sha256"].equal(other.state_dict()["graph_sha256"])
    # a damaged graph is refused by its recorded digest
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    with open(damaged / "text.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(OnnxFolderError, match="SHA-256"):
        polyclip.load(damaged)
    # a manifest that is not one, or of another version, is a one-line error
    for text, message in (
        ("{", "cannot read"),
        ('{"format": "polyclip-onnx", "format_version": 9}', "format_version 9"),
    ):
        (damaged / MANIFEST_NAME).write_text(text)
        with pytest.raises(OnnxFolderError, match=message):
            polyclip.load(damaged)
    # the exporter refuses to write over anything that is not a previous export
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    model = exports["resnet"][0]
    with pytest.raises(OnnxFolderError, match="not empty"):
        export_onnx(model, exports["resnet"][1], exports["resnet"][2], tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(OnnxFolderError, match="already holds"):
        export_onnx(model, exports["resnet"][1], exports["resnet"][2], folder)


def test_index_build_and_serve_through_onnx(exports, tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from polyclip.serve import ServeConfig, create_app

    _, _, _, folder = exports["vit"]
    paths = _shapes(tmp_path / "images", 6)
    out = tmp_path / "index"
    built = runner.invoke(
        app, ["index", "build", str(tmp_path / "images"), "--model", str(folder), "--out", str(out), "-q"]
    )
    assert built.exit_code == 0, built.output
    found = runner.invoke(app, ["index", "search", str(out), "--image", str(paths[3]), "-k", "1", "--json"])
    assert found.exit_code == 0, found.output
    hit = json.loads(found.output)[0]
    assert hit["path"] == str(paths[3].resolve()) and hit["score"] == pytest.approx(
        1.0, abs=SELF_SCORE_TOLERANCE
    )
    # the service loads the index's own model (the export) by the source the index recorded
    with TestClient(create_app(out, ServeConfig())) as client:
        response = client.post("/search", json={"text": "a white square", "k": 3})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3
