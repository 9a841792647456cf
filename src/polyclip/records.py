"""Record files in JSON: what the training pairs, evaluation captions, index captions and video
annotations are read from.

``.jsonl``: one JSON object a line (blank lines skipped). ``.json``: a list of objects, or an object
whose ``"images"`` key holds that list, the layout of the Karpathy splits of COCO and Flickr
(``dataset_coco.json``) and of RSICD's ``dataset_rsicd.json``. Each record comes with where it was
read ("file, line 3" or "file, record 2"), so an error about its content can name the place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_records(
    path: str | Path, error: type[Exception] = ValueError
) -> list[tuple[str, dict[str, Any]]]:
    """(origin, record) for every record of ``path``; any problem with the file raises ``error``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as problem:
        raise error(f"cannot read {path}: {problem}") from None
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}, line {number}", json.loads(line)))
            except json.JSONDecodeError as problem:
                raise error(f"{path}, line {number}: not valid JSON ({problem.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as problem:
            raise error(f"{path}: not valid JSON ({problem.msg}, line {problem.lineno})") from None
        items = data.get("images") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise error(f"{path}: expected a list of records or {{'images': [...]}} (a dataset_*.json file)")
        records = [(f"{path}, record {number}", item) for number, item in enumerate(items)]
    for origin, record in records:
        if not isinstance(record, dict):
            raise error(f"{origin}: expected a JSON object, got {type(record).__name__}")
    return records
