"""Feature extraction and the on-disk cache: identical features on a hit, invalidation on change."""

import pytest
import torch

from polyclip.eval.cache import FeatureCache, ModelFeatures, state_dict_fingerprint
from polyclip.eval.data import FileImages, read_image_folder
from polyclip.eval.errors import EvalError
from polyclip.eval.features import EncodeConfig, encode_images
from test_eval_support import COLOURS, FakePreprocess, FakeTokenizer, colour_folder, fake_triple, save_square


def features_for(model, cache_dir, **kwargs):
    return ModelFeatures(
        "fake",
        model,
        FakePreprocess(),
        FakeTokenizer(),
        EncodeConfig(batch_size=2, num_workers=0),
        FeatureCache(cache_dir),
        **kwargs,
    )


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    good = [save_square(tmp_path / f"{i}.png", COLOURS["red"]) for i in range(3)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:40])
    images = FileImages([good[0], broken, good[1], truncated, good[2], tmp_path / "missing.png"])
    model, preprocess, _ = fake_triple()
    encoded = encode_images(model, preprocess, images, EncodeConfig(batch_size=2, num_workers=0))
    assert encoded.indices.tolist() == [0, 2, 4]
    assert [index for index, _ in encoded.skipped] == [1, 3, 5]
    assert "broken.png" in encoded.skipped[0][1]
    assert encoded.features.shape == (3, 3) and encoded.features.dtype == torch.float32


def test_decoding_threads_give_the_same_features(tmp_path):
    data = read_image_folder(colour_folder(tmp_path, ["red", "green", "blue"], per_class=3))
    model, preprocess, _ = fake_triple()
    in_process = encode_images(model, preprocess, data.images, EncodeConfig(batch_size=4, num_workers=0))
    workers = encode_images(model, preprocess, data.images, EncodeConfig(batch_size=4, num_workers=2))
    assert torch.equal(in_process.features, workers.features)
    assert in_process.indices.tolist() == workers.indices.tolist() == list(range(9))


def test_preprocessing_of_mixed_shapes_is_a_clear_error(tmp_path):
    data = read_image_folder(colour_folder(tmp_path, ["red", "green"], per_class=2))
    model, preprocess, _ = fake_triple()

    def mixed(image):  # green images come out 2 x 2, red ones 4 x 4
        pixels = preprocess(image)
        return pixels[:, :2, :2] if pixels[1].mean() > pixels[0].mean() else pixels

    with pytest.raises(EvalError, match="different shapes"):
        encode_images(model, mixed, data.images, EncodeConfig(batch_size=4, num_workers=1))


def test_encode_restores_training_mode_and_batches_texts(tmp_path):
    model, _, _ = fake_triple()
    model.train()
    run = features_for(model, tmp_path / "cache")
    run.encode.text_batch_size = 2
    features = run.texts(["a red.", "a blue.", "a green."])
    assert features.shape == (3, 3) and model.training and model.text_calls == 2
    assert run.images(FileImages([save_square(tmp_path / "a.png", COLOURS["red"])])).features.shape == (1, 3)
    assert model.training


def test_cache_returns_identical_features_without_re_encoding(tmp_path):
    data = read_image_folder(colour_folder(tmp_path / "data", ["red", "blue"], per_class=2))
    model, _, _ = fake_triple()
    first = features_for(model, tmp_path / "cache").images(data.images)
    calls = model.image_calls
    second_run = features_for(model, tmp_path / "cache")
    second = second_run.images(data.images)
    assert model.image_calls == calls  # nothing re-encoded
    assert second_run.hits == 1 and second_run.misses == 0
    assert torch.equal(first.features, second.features)
    assert first.indices.tolist() == second.indices.tolist()


def test_cache_keeps_skipped_images(tmp_path):
    good = save_square(tmp_path / "a.png", COLOURS["red"])
    broken = tmp_path / "b.png"
    broken.write_bytes(b"junk")
    model, _, _ = fake_triple()
    first = features_for(model, tmp_path / "cache").images(FileImages([good, broken]))
    second = features_for(model, tmp_path / "cache").images(FileImages([good, broken]))
    assert second.skipped == first.skipped and len(second.skipped) == 1


def test_cache_is_invalidated_when_an_image_changes(tmp_path):
    data = read_image_folder(colour_folder(tmp_path / "data", ["red", "blue"], per_class=2))
    model, _, _ = fake_triple()
    before = features_for(model, tmp_path / "cache").images(data.images)
    save_square(data.images.paths[0], COLOURS["green"], size=10)  # new content, size and mtime
    after_run = features_for(model, tmp_path / "cache")
    after = after_run.images(data.images)
    assert after_run.misses == 1
    assert not torch.equal(before.features[0], after.features[0])
    assert torch.equal(before.features[1:], after.features[1:])


def test_content_fingerprint_sees_same_size_rewrites(tmp_path):
    path = save_square(tmp_path / "data" / "a.png", COLOURS["red"])
    images = FileImages([path])
    model, _, _ = fake_triple()
    features_for(model, tmp_path / "cache", content_fingerprint=True).images(images)
    stat = path.stat()
    save_square(path, (254, 0, 0))  # same size on disk, different bytes
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    again = features_for(model, tmp_path / "cache", content_fingerprint=True)
    again.images(images)
    assert again.misses == 1


def test_cache_distinguishes_models_and_adding_images(tmp_path):
    data = read_image_folder(colour_folder(tmp_path / "data", ["red", "blue"], per_class=1))
    model_a, _, _ = fake_triple(seed=0)
    model_b, _, _ = fake_triple(seed=1)
    assert state_dict_fingerprint(model_a) != state_dict_fingerprint(model_b)
    features_for(model_a, tmp_path / "cache").images(data.images)
    other = features_for(model_b, tmp_path / "cache")
    other.images(data.images)
    assert other.misses == 1
    save_square(tmp_path / "data" / "red" / "new.png", COLOURS["red"])
    grown = features_for(model_a, tmp_path / "cache")
    assert grown.images(read_image_folder(tmp_path / "data").images).features.shape[0] == 3
    assert grown.misses == 1


def test_text_and_class_weight_cache(tmp_path):
    model, _, _ = fake_triple()
    first = features_for(model, tmp_path / "cache")
    weights = first.class_weights(["red", "blue"], ["a photo of a {}."])
    texts = first.texts(["red car", "blue sky"])
    calls = model.text_calls
    second = features_for(model, tmp_path / "cache")
    assert torch.equal(second.class_weights(["red", "blue"], ["a photo of a {}."]), weights)
    assert torch.equal(second.texts(["red car", "blue sky"]), texts)
    assert model.text_calls == calls and second.hits == 2
    second.class_weights(["red", "blue"], ["a {} thing."])  # other templates: a miss
    assert second.misses == 1


def test_damaged_cache_entry_is_a_miss(tmp_path):
    model, _, _ = fake_triple()
    first = features_for(model, tmp_path / "cache")
    first.texts(["red"])
    for entry in (tmp_path / "cache").glob("*.safetensors"):
        entry.write_bytes(b"garbage")
    second = features_for(model, tmp_path / "cache")
    assert torch.equal(second.texts(["red"]), first.texts(["red"]))
    assert second.misses == 1
