"""JSON record files: the three layouts, where each record came from, and a clear error for bad files."""

import pytest

from polyclip.records import read_json_records


class RecordError(ValueError):
    pass


@pytest.mark.parametrize(
    ("name", "text", "origins"),
    [
        ("a.jsonl", '{"x": 1}\n\n{"x": 2}\n', ["line 1", "line 3"]),
        ("a.json", '[{"x": 1}, {"x": 2}]', ["record 0", "record 1"]),
        (
            "dataset_rsicd.json",
            '{"images": [{"x": 1}, {"x": 2}], "dataset": "rsicd"}',
            ["record 0", "record 1"],
        ),
    ],
)
def test_layouts_and_origins(tmp_path, name, text, origins):
    path = tmp_path / name
    path.write_text(text)
    records = read_json_records(path, RecordError)
    assert [record for _, record in records] == [{"x": 1}, {"x": 2}]
    assert [origin for origin, _ in records] == [f"{path}, {where}" for where in origins]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", b'{"x": 1}\n{"x": \n', "line 2: not valid JSON"),
        ("a.json", b'[{"x": 1},', "not valid JSON"),
        ("a.json", b'{"annotations": []}', "expected a list of records"),
        ("a.jsonl", b'{"x": 1}\n[1, 2]\n', "line 2: expected a JSON object, got list"),
        ("a.json", b"\xff\xfe\x00", "cannot read"),
        ("missing.json", None, "cannot read"),
    ],
)
def test_bad_files_raise_the_callers_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RecordError, match=message):
        read_json_records(path, RecordError)
