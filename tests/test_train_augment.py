"""The one training augmentation pipeline (`polyclip.train.augment`): seeded per sample, torchvision's
algorithms, and the same in any data-loader worker (fork, spawn or forkserver)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from polyclip.train.augment import build_train_augmentation
from polyclip.train.config import AugmentConfig, TrainConfigError
from polyclip.transforms import PreprocessConfig


def _photo(size=(96, 96)) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize(size, Image.NEAREST)  # structured, so that crops differ


def _augmentation(**kwargs):
    return build_train_augmentation(PreprocessConfig(image_size=48), AugmentConfig(**kwargs))


def test_shapes_seeds_and_flip():
    photo = _photo()
    plain = _augmentation()(photo, 11)
    assert plain.shape == (3, 48, 48) and plain.dtype == torch.float32 and torch.isfinite(plain).all()
    assert torch.equal(_augmentation()(photo, 11), plain)
    assert not torch.equal(_augmentation()(photo, 12), plain)
    # the crop draws come first, so the same seed with hflip=1 gives the mirror image
    assert torch.equal(_augmentation(hflip=1.0)(photo, 11), plain.flip(-1))
    jittered = _augmentation(hflip=0.5, vflip=0.5, color_jitter=(0.3, 0.3, 0.3, 0.05))
    outputs = [jittered(photo, seed) for seed in range(3)]
    assert all(torch.isfinite(o).all() and o.shape == (3, 48, 48) for o in outputs)
    assert "RandomResizedCrop" in repr(jittered) and jittered.config.image_size == 48
    with pytest.raises(TrainConfigError, match="color_jitter"):
        _augmentation(color_jitter=(0.1, 0.2))
    with pytest.raises(TrainConfigError, match="random_crop"):
        _augmentation(random_crop=1.5)


def test_survives_pickling_and_replays():
    photo = _photo()
    augmentation = _augmentation(hflip=0.5, color_jitter=(0.2,))
    first = augmentation(photo, 5)
    restored = pickle.loads(pickle.dumps(augmentation))  # as sent to a spawned data-loader worker
    assert torch.equal(restored(photo, 5), first)


class _Samples(torch.utils.data.Dataset):
    """Four samples of one photo, each augmented with its own index as seed (module level: picklable)."""

    def __init__(self, augmentation) -> None:
        self.augmentation, self.photo = augmentation, _photo((80, 80))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.augmentation(self.photo, index)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_sample_is_augmented_alike_in_any_worker(context):
    augmentation = _augmentation(hflip=0.5)
    expected = torch.stack([augmentation(_photo((80, 80)), index) for index in range(4)])
    loader = torch.utils.data.DataLoader(
        _Samples(augmentation), batch_size=2, num_workers=2, multiprocessing_context=context
    )
    assert torch.equal(torch.cat(list(loader)), expected)
