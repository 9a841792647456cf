"""Training data: readers of every format, the resumable distributed sampler, unreadable images,
per-sample seeded augmentations and webdataset shards split across ranks and workers."""

from __future__ import annotations

import pytest
import torch

from polyclip.tokenizers import ClipTokenizer
from polyclip.train.augment import build_train_augmentation
from polyclip.train.config import AugmentConfig, DataConfig, TrainConfigError
from polyclip.train.data import Collate, DataError, EpochBatchSampler, PairDataset, SampleKey, read_records
from polyclip.transforms import PreprocessConfig
from test_train_fixtures import (  # single_thread: autouse fixture
    colour_pairs,
    single_thread,  # noqa: F401
    write_csv,
    write_image_folder,
    write_jsonl,
    write_rsicd_json,
)

PREPROCESS = PreprocessConfig(image_size=32)


def _augmentation(**kwargs):
    return build_train_augmentation(PREPROCESS, AugmentConfig(**kwargs))


def test_readers_of_every_table_format(tmp_path):
    records = colour_pairs(tmp_path, 6)
    jsonl = read_records(DataConfig(train=str(write_jsonl(tmp_path / "pairs.jsonl", records))))
    assert [len(r.captions) for r in jsonl] == [2] * 6
    assert jsonl[0].image == str(tmp_path / "images" / "0000.png")
    each = read_records(DataConfig(train=str(tmp_path / "pairs.jsonl"), captions="each"))
    assert len(each) == 12 and all(len(r.captions) == 1 for r in each)
    csv_records = read_records(DataConfig(train=str(write_csv(tmp_path / "pairs.csv", records))))
    tsv_records = read_records(DataConfig(train=str(write_csv(tmp_path / "pairs.tsv", records, "\t"))))
    assert (
        [r.captions for r in csv_records]
        == [r.captions for r in tsv_records]
        == [[r["captions"][0]] for r in records]
    )
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pyarrow.table(
        {"filepath": [r["image"] for r in records], "text": [r["captions"] for r in records]}
    )
    pq.write_table(table, tmp_path / "pairs.parquet")
    parquet = read_records(DataConfig(train=str(tmp_path / "pairs.parquet")))
    assert [r.captions for r in parquet] == [r["captions"] for r in records]


def test_rsicd_split_file_and_image_folder(tmp_path):
    records = colour_pairs(tmp_path, 10)
    path = write_rsicd_json(tmp_path / "dataset_rsicd.json", records)
    train = read_records(DataConfig(train=str(path), split="train", captions="each"))
    assert len(train) == 8 * 2  # 2 of 10 images are in "val"; every caption is a sample
    folder = read_records(
        DataConfig(train=str(write_image_folder(tmp_path / "folder")), folder_templates=("a {} patch", "{}"))
    )
    assert len(folder) == 12 and folder[0].captions == ["a blue patch", "blue"]


def test_caption_templates_and_text_types(tmp_path):
    rows = tmp_path / "places.csv"
    rows.write_text("image,city,region,country,taxonomic,common\na.png,Paris,Ile-de-France,France,t1,c1\n")
    streets = read_records(
        DataConfig(train=str(rows), caption_template="A photo in {city}, {region}, {country}.")
    )
    assert streets[0].captions == ["A photo in Paris, Ile-de-France, France."]
    typed = read_records(DataConfig(train=str(rows), text_types=("taxonomic", "common")))
    assert typed[0].typed_captions == {"taxonomic": "t1", "common": "c1"}
    with pytest.raises(DataError, match="names the field 'altitude'"):
        read_records(DataConfig(train=str(rows), caption_template="{altitude}"))


def test_clear_errors_for_unusable_data(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n")
    with pytest.raises(DataError, match="empty"):
        read_records(DataConfig(train=str(empty)))
    with pytest.raises(DataError, match="does not exist"):
        read_records(DataConfig(train=str(tmp_path / "absent.csv")))
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("picture,words\na.png,hello\n")
    with pytest.raises(DataError, match="no image field"):
        read_records(DataConfig(train=str(wrong)))
    with pytest.raises(DataError, match="cannot tell the format"):
        read_records(DataConfig(train=str(tmp_path / "pairs.xlsx")))
    with pytest.raises(DataError, match="empty"):
        PairDataset([], _augmentation(), seed=0)


def test_ranks_together_draw_the_one_process_batch():
    single = list(EpochBatchSampler(40, 8, rank=0, world_size=1, seed=3, epoch=1))
    ranks = [list(EpochBatchSampler(40, 8, rank=r, world_size=2, seed=3, epoch=1)) for r in range(2)]
    assert len(single) == 5
    for batch, (left, right) in zip(single, zip(*ranks)):
        assert batch == left + right
    resumed = list(EpochBatchSampler(40, 8, rank=0, world_size=1, seed=3, epoch=1, start_batch=3))
    assert resumed == single[3:]
    other_epoch = list(EpochBatchSampler(40, 8, rank=0, world_size=1, seed=3, epoch=2))
    assert other_epoch != single
    with pytest.raises(TrainConfigError, match="multiple of the number of processes"):
        EpochBatchSampler(40, 9, rank=0, world_size=2, seed=0, epoch=0)


def test_unreadable_images_are_replaced_and_counted(tmp_path):
    records = read_records(
        DataConfig(
            train=str(write_jsonl(tmp_path / "p.jsonl", colour_pairs(tmp_path, 8, corrupt=1, missing=1)))
        )
    )
    dataset = PairDataset(records, _augmentation(), seed=0)
    batch = Collate(ClipTokenizer(context_length=16))([dataset[SampleKey(0, 0, i)] for i in range(8)])
    assert batch.pixels.shape == (8, 3, 32, 32) and batch.token_ids.shape == (8, 16)
    assert len(batch.skipped) == 2
    assert any("0000.png" in reason for reason in batch.skipped) and any(
        "0001.png" in reason for reason in batch.skipped
    )
    hopeless = PairDataset(records[:2], _augmentation(), seed=0, max_bad_in_a_row=3)
    with pytest.raises(DataError, match="unreadable images in a row"):
        hopeless[SampleKey(0, 0, 0)]


def test_augmentation_is_a_function_of_the_sample_key(tmp_path):
    records = read_records(
        DataConfig(train=str(write_jsonl(tmp_path / "p.jsonl", colour_pairs(tmp_path, 4))))
    )
    augment = _augmentation(random_resized_crop=(0.3, 1.0), hflip=0.5, color_jitter=(0.4, 0.4, 0.4, 0.1))
    dataset = PairDataset(records, augment, seed=5)
    first = dataset[SampleKey(2, 0, 1)][0]
    dataset[SampleKey(0, 0, 3)]  # other draws in between change nothing
    assert torch.equal(dataset[SampleKey(2, 7, 1)][0], first)
    assert not torch.equal(dataset[SampleKey(3, 0, 1)][0], first)  # another epoch, another crop
    crop = _augmentation(random_crop=0.8, random_resized_crop=None, vflip=1.0)
    assert PairDataset(records, crop, seed=0)[SampleKey(0, 0, 0)][0].shape == (3, 32, 32)


def test_one_text_type_per_batch(tmp_path):
    rows = tmp_path / "typed.csv"
    lines = ["image,scientific,common"] + [
        f"{r['image']},sci {r['colour']},com {r['colour']}" for r in colour_pairs(tmp_path, 8)
    ]
    rows.write_text("\n".join(lines) + "\n")
    records = read_records(DataConfig(train=str(rows), text_types=("scientific", "common")))
    dataset = PairDataset(records, _augmentation(), seed=0, text_types=("scientific", "common"))
    kinds = []
    for batch in range(12):
        samples = [dataset[SampleKey(0, batch, index)] for index in range(8)]
        assert len({s[3] for s in samples}) == 1  # every caption of a batch has the batch's type
        assert all(s[1].startswith(s[3][:3]) for s in samples)
        kinds.append(samples[0][3])
    assert set(kinds) == {"scientific", "common"}
