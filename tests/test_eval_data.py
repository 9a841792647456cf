"""Data readers: ImageFolder, CSV, captions (CSV / JSONL / split JSON), idx files; clear errors."""

import gzip
import json

import numpy as np
import pytest

from polyclip.eval.data import (
    FileImages,
    load_labeled,
    read_captions,
    read_idx,
    read_idx_array,
    read_image_csv,
    read_image_folder,
    resolve_class_names,
)
from polyclip.eval.errors import DataError
from test_eval_support import COLOURS, colour_folder, save_square


def write_idx(path, array, compress=False):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def test_image_folder(tmp_path):
    colour_folder(tmp_path, ["red", "blue", "green"], per_class=2)
    data = read_image_folder(tmp_path)
    assert data.class_names == ["blue", "green", "red"]  # sorted
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.asarray(data.images.load(5)).reshape(-1, 3)[0].tolist() == [247, 0, 0]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_image_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    save_square(tmp_path / "red" / "a.png", COLOURS["red"])
    with pytest.raises(DataError, match="empty_class"):
        read_image_folder(tmp_path)


def test_image_folder_with_display_names(tmp_path):
    colour_folder(tmp_path, ["red", "blue"], per_class=1)
    (tmp_path.parent / "names.txt").write_text("blue thing\nred thing\n")
    data = load_labeled(tmp_path, class_names=str(tmp_path.parent / "names.txt"))
    assert data.class_names == ["blue thing", "red thing"]
    (tmp_path.parent / "short.txt").write_text("only one\n")
    with pytest.raises(DataError, match="1 class names given for 2"):
        load_labeled(tmp_path, class_names=str(tmp_path.parent / "short.txt"))


def test_csv_dataset(tmp_path):
    save_square(tmp_path / "img" / "a.png", COLOURS["red"])
    save_square(tmp_path / "img" / "b.png", COLOURS["blue"])
    (tmp_path / "data.csv").write_text("path,label\nimg/a.png,red\nimg/b.png,blue\n")
    data = read_image_csv(tmp_path / "data.csv")
    assert data.class_names == ["blue", "red"] and data.labels.tolist() == [1, 0]
    assert data.images.paths[0] == tmp_path / "img" / "a.png"
    given = read_image_csv(tmp_path / "data.csv", class_names=["red", "blue", "green"])
    assert given.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("path,label\n", "no rows"),
        ("file,label\na.png,red\n", "no column 'path'"),
        ("path,label\na.png,\n", "line 2: empty"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        read_image_csv(tmp_path / "bad.csv")


def test_csv_unknown_label(tmp_path):
    (tmp_path / "d.csv").write_text("path,label\na.png,purple\n")
    with pytest.raises(DataError, match="line 2: label 'purple'"):
        read_image_csv(tmp_path / "d.csv", class_names=["red"])


def test_numeric_labels_sort_numerically(tmp_path):
    (tmp_path / "d.csv").write_text("path,label\na.png,10\nb.png,9\nc.png,2\n")
    assert read_image_csv(tmp_path / "d.csv").class_names == ["2", "9", "10"]


def test_captions_csv_groups_captions_by_image(tmp_path):
    (tmp_path / "c.csv").write_text("image,caption\na.png,first\nb.png,second\na.png,third\n")
    data = read_captions(tmp_path / "c.csv")
    assert data.captions == ["first", "second", "third"]
    assert data.caption_to_image.tolist() == [0, 1, 0]
    assert [p.name for p in data.images.paths] == ["a.png", "b.png"]


def test_captions_jsonl_both_layouts(tmp_path):
    lines = [
        {"filename": "a.png", "captions": ["one", "two"]},
        {"image": "b.png", "caption": "three"},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    data = read_captions(tmp_path / "c.jsonl", image_root=tmp_path / "images")
    assert data.captions == ["one", "two", "three"]
    assert data.caption_to_image.tolist() == [0, 0, 1]
    assert data.images.paths[1] == tmp_path / "images" / "b.png"


def test_captions_split_json(tmp_path):
    payload = {
        "images": [
            {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x one"}, {"raw": "x two"}]},
            {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "y"}]},
            {"filepath": "val2014", "filename": "c.jpg", "split": "test", "sentences": [{"raw": "z"}]},
        ]
    }
    (tmp_path / "dataset_x.json").write_text(json.dumps(payload))
    data = read_captions(tmp_path / "dataset_x.json", split="test")
    assert data.captions == ["x one", "x two", "z"]
    assert data.images.paths[1] == tmp_path / "val2014" / "c.jpg"
    with pytest.raises(DataError, match="split 'nope'"):
        read_captions(tmp_path / "dataset_x.json", split="nope")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.jsonl", '{"image": "a.png", "caption": "ok"}\n{not json\n', "line 2: not valid JSON"),
        ("c.jsonl", '{"caption": "no image"}\n', "no image path"),
        ("c.jsonl", '{"image": "a.png"}\n', "no caption"),
        ("c.jsonl", '{"image": "a.png", "caption": "  "}\n', "empty or non-text caption"),
        ("c.json", '{"images": 3}', "expected a list"),
        ("c.csv", "image,caption\n", "no rows"),
        ("c.txt", "whatever", "unknown format"),
    ],
)
def test_caption_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_captions(tmp_path / name)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files(tmp_path, compress):
    suffix = ".gz" if compress else ""
    pixels = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", pixels, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.array([2, 0, 9], dtype=np.uint8), compress)
    data = read_idx(
        tmp_path / f"t10k-images-idx3-ubyte{suffix}", class_names=resolve_class_names("fashion-mnist")
    )
    assert data.labels.tolist() == [2, 0, 9] and data.class_names[9] == "Ankle boot"
    image = data.images.load(1)
    assert image.size == (5, 4) and image.mode == "RGB"
    assert np.asarray(image)[..., 0].tolist() == pixels[1].tolist()
    np.testing.assert_array_equal(read_idx_array(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), pixels)


def test_idx_errors(tmp_path):
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx_array(tmp_path / "bad-images-idx3-ubyte")
    array = np.zeros((2, 3, 3), dtype=np.uint8)
    path = write_idx(tmp_path / "x-images-idx3-ubyte", array)
    path.write_bytes(path.read_bytes()[:-1])  # truncated
    with pytest.raises(DataError, match="header promises"):
        read_idx_array(path)
    write_idx(tmp_path / "y-images-idx3-ubyte", array)
    write_idx(tmp_path / "y-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match="labels for 2 images"):
        read_idx(tmp_path / "y-images-idx3-ubyte")


def test_fingerprint_changes_with_file_content(tmp_path):
    path = save_square(tmp_path / "a.png", COLOURS["red"])
    images = FileImages([path])
    before_stat, before_content = images.fingerprint(), images.fingerprint(content=True)
    save_square(path, COLOURS["blue"], size=9)
    assert images.fingerprint() != before_stat
    assert images.fingerprint(content=True) != before_content


def test_load_labeled_dispatch_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_labeled(tmp_path / "nope.csv")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        load_labeled(tmp_path / "data.parquet")
    with pytest.raises(DataError, match="not a file"):
        resolve_class_names("no-such-preset")
