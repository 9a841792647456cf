"""The public API end to end: load, zero-shot, save/reload, hub resolution offline, quantisation."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

import polyclip
from polyclip.checkpoints import CheckpointError
from polyclip.hub import ModelNotFoundError, registry
from polyclip.transforms import PRESETS


def _colour(rgb):
    return Image.new("RGB", (48, 40), rgb)


def test_load_hf_folder_matches_transformers(tiny_hf_clip_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    model, preprocess, tokenizer = polyclip.load(tiny_hf_clip_dir)
    assert not model.training and model.logit_bias is None
    pixels = torch.stack([preprocess(_colour((200, 30, 30))), preprocess(_colour((10, 10, 220)))])
    ids = tokenizer(["a red square", "a blue square", ""])
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=pixels)
        ours = model(pixels, ids)
    torch.testing.assert_close(ours.logits_per_image, out.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.text_embeds, out.text_embeds, atol=1e-5, rtol=1e-5)


def test_zero_shot_classifier_probabilities(tiny_hf_clip_dir):
    model, preprocess, tokenizer = polyclip.load(tiny_hf_clip_dir)
    classifier = polyclip.zero_shot_classifier(
        model, tokenizer, ["red", "green", "blue"], templates="openai_imagenet", preprocess=preprocess
    )
    probs = classifier.predict([_colour((255, 0, 0)), _colour((0, 0, 255))])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2))
    # the classifier's logits are the model's own logits against the ensembled class weights
    pixels = torch.stack([preprocess(_colour((255, 0, 0)))])
    with torch.no_grad():
        expected = model.logits(model.encode_image(pixels, normalize=True), classifier.weights)
    torch.testing.assert_close(classifier.logits(pixels), expected)
    top = classifier.top_k([_colour((255, 0, 0))], k=2)[0]
    assert len(top) == 2 and top[0][1] >= top[1][1]


def test_zero_shot_sigmoid_for_siglip():
    model = polyclip.create_model("tiny-siglip").eval()

    class Tokenizer:  # SigLIP-style ids: last position is the end token
        pad_token_id = 1

        def __call__(self, texts):
            return torch.stack([torch.tensor([hash(t) % 900 + 2] * 8 + [1] * 56) for t in texts])

    classifier = polyclip.zero_shot_classifier(model, Tokenizer(), ["a", "b", "c"])
    probs = classifier.predict(torch.randn(2, 3, 32, 32))
    assert probs.shape == (2, 3) and ((probs > 0) & (probs < 1)).all()
    assert not torch.allclose(probs.sum(-1), torch.ones(2))  # independent sigmoids, not a softmax


def test_zero_shot_rejects_bad_templates(tiny_hf_clip_dir):
    model, _, tokenizer = polyclip.load(tiny_hf_clip_dir)
    with pytest.raises(ValueError, match="placeholder"):
        polyclip.zero_shot_classifier(model, tokenizer, ["a"], templates=["no placeholder"])
    with pytest.raises(ValueError, match="at least one class"):
        polyclip.zero_shot_classifier(model, tokenizer, [])


def test_save_and_reload_native(tiny_hf_clip_dir, tmp_path):
    model, preprocess, tokenizer = polyclip.load(tiny_hf_clip_dir)
    polyclip.save(model, preprocess, tokenizer, tmp_path / "saved")
    again, preprocess2, tokenizer2 = polyclip.load(tmp_path / "saved")
    assert preprocess2.config == preprocess.config and tokenizer2.config == tokenizer.config
    ids = tokenizer(["hello world"])
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(ids), model.encode_text(ids), atol=0, rtol=0)


def _fake_hub_cache(root, repo_id, source):
    """Lay out huggingface_hub's cache for repo_id with the files of ``source``."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_hub_id_loads_from_cache_offline(tiny_hf_clip_dir, tmp_path, monkeypatch):
    _fake_hub_cache(tmp_path, "someone/tiny-clip", tiny_hf_clip_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _, tokenizer = polyclip.load("hf-hub:someone/tiny-clip")
    assert model.config.embed_dim == 32


def test_offline_error_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as error:
        polyclip.load("plip")
    message = str(error.value)
    assert "vinid/plip" in message and "hf download vinid/plip" in message


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelNotFoundError, match="Did you mean.*bioclip"):
        polyclip.load("bioclipp")


def test_registry_refuses_wrong_architecture(tiny_hf_clip_dir, tmp_path, monkeypatch):
    # a cached "plip" whose files are a tiny model must not load silently as PLIP
    _fake_hub_cache(tmp_path, "vinid/plip", tiny_hf_clip_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="expects architecture ViT-B-32"):
        polyclip.load("plip")


def test_registry_entries_are_complete():
    entries = registry()
    systems = {e.system for e in entries.values()}
    for system in (
        "OpenAI CLIP",
        "PubMedCLIP",
        "PLIP",
        "SigLIP",
        "StreetCLIP",
        "FashionCLIP",
        "CLIP-RSICD",
        "BioCLIP",
    ):
        assert system in systems
    for entry in entries.values():
        assert entry.architecture in polyclip.list_architectures()
        assert entry.format in ("hf", "open_clip", "openai", "flax")
        assert entry.license and entry.hub_id.count("/") == 1


def test_int8_quantisation_keeps_embeddings(tiny_hf_clip_dir):
    fp32, preprocess, tokenizer = polyclip.load(tiny_hf_clip_dir)
    int8, _, _ = polyclip.load(tiny_hf_clip_dir, quantize="int8")
    pixels = torch.randn(4, 3, 32, 32)
    ids = tokenizer(["a photo of a cat", "a dog", "a red car on a street", "x"])
    with torch.no_grad():
        assert (
            torch.nn.functional.cosine_similarity(fp32.encode_image(pixels), int8.encode_image(pixels)).min()
            > 0.99
        )
        assert (
            torch.nn.functional.cosine_similarity(fp32.encode_text(ids), int8.encode_text(ids)).min() > 0.99
        )
    with pytest.raises(ValueError, match="int8"):
        polyclip.load(tiny_hf_clip_dir, quantize="int4")


def test_bf16_load(tiny_hf_clip_dir):
    model, preprocess, tokenizer = polyclip.load(tiny_hf_clip_dir, dtype="bf16")
    reference, _, _ = polyclip.load(tiny_hf_clip_dir)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        low = model.encode_image(pixels, normalize=True).float()
        high = reference.encode_image(pixels, normalize=True)
    assert low.dtype == torch.float32 and torch.nn.functional.cosine_similarity(low, high).min() > 0.99


def test_bad_dtype_is_a_clear_error(tiny_hf_clip_dir):
    with pytest.raises(ValueError, match="unknown dtype"):
        polyclip.load(tiny_hf_clip_dir, dtype="fp8")


def test_names_a_user_types_are_understood(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a bare hub id: its hf-hub: form and the registry name of that repository
    with pytest.raises(ModelNotFoundError) as error:
        polyclip.load("openai/clip-vit-base-patch32")
    assert "'hf-hub:openai/clip-vit-base-patch32'" in str(error.value)
    assert "'clip-vit-b-32'" in str(error.value)
    # an architecture name: random weights through create_model, and the released weights of it
    with pytest.raises(ModelNotFoundError) as error:
        polyclip.load("vit-b-32")
    assert "polyclip.create_model('ViT-B-32')" in str(error.value) and "'plip'" in str(error.value)
    # registry names are case-insensitive: PLIP resolves to vinid/plip (absent from this cache)
    with pytest.raises(ModelNotFoundError, match="hf download vinid/plip"):
        polyclip.load("PLIP")
    with pytest.raises(ModelNotFoundError, match="Did you mean 'clip-vit-b-32'"):
        polyclip.load("clip-vit-b32")


def test_create_model_and_transforms_gives_all_three(tmp_path):
    torch.manual_seed(0)
    model, preprocess, tokenizer = polyclip.create_model_and_transforms("tiny-vit")
    assert not model.training
    assert preprocess.config.image_size == model.image_size
    assert preprocess.config.mean == PRESETS["clip"].mean
    pixels = preprocess(_colour((200, 30, 30))).unsqueeze(0)
    ids = tokenizer(["a red square"])
    assert ids.shape == (1, model.config.text.context_length)
    with torch.no_grad():
        before = model(pixels, ids).logits_per_image
    polyclip.save(model, preprocess, tokenizer, tmp_path / "tiny")
    reloaded, preprocess2, tokenizer2 = polyclip.load(tmp_path / "tiny")
    assert preprocess2.config == preprocess.config
    torch.testing.assert_close(tokenizer2(["a red square"]), ids)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels, ids).logits_per_image, before)
    # SigLIP's vocabulary has no bundled tokenizer: a clear error, and the family's preprocessing
    with pytest.raises(ValueError, match="pass tokenizer="):
        polyclip.create_model_and_transforms("tiny-siglip")
    _, siglip_preprocess, clip_tokenizer = polyclip.create_model_and_transforms(
        "tiny-siglip", tokenizer={"type": "clip", "context_length": 64}
    )
    assert siglip_preprocess.config.mean == (0.5, 0.5, 0.5)
    assert clip_tokenizer(["x"]).shape == (1, 64)
