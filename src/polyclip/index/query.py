"""One query against an index folder, encoded by the model the index was built with.

What ``polyclip index search`` runs; a service that answers many queries keeps its `Index` and
`Encoder` open instead (`polyclip.serve`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from polyclip.index.encoder import Encoder
from polyclip.index.index import Index, SearchHit


def search_folder(
    folder: str | os.PathLike,
    text: str | None = None,
    image: str | os.PathLike | None = None,
    k: int = 10,
    filter: dict[str, Any] | None = None,
    space: str = "image",
    device: str | None = None,
) -> list[SearchHit]:
    """The top-``k`` items for one text or one image query (exactly one), optionally filtered."""
    if (text is None) == (image is None):
        raise ValueError("give exactly one of a text or an image query")
    with Index(folder) as index:
        encoder = Encoder.load(index.identity.source, device=device, dtype=index.identity.dtype)
        queries = encoder.encode_texts([text]) if text is not None else encoder.encode_images([Path(image)])
        return index.search(queries, k, filter, space)[0]
