"""HTTP search service over a polyclip index (FastAPI + uvicorn) and its web page.

    polyclip serve my-index --port 8000
    curl -s localhost:8000/search -H 'content-type: application/json' -d '{"text": "a red bicycle", "k": 5}'

Requires ``pip install 'polyclip[serve]'``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from polyclip.serve.config import ServeConfig

if TYPE_CHECKING:
    from polyclip.serve.app import create_app
    from polyclip.serve.batching import DynamicBatcher
    from polyclip.serve.service import SearchService

# imported on first use: `polyclip.serve.metrics` or the config alone need neither torch nor FastAPI
_LAZY = {"create_app": "app", "DynamicBatcher": "batching", "SearchService": "service"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"polyclip.serve.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'polyclip.serve' has no attribute {name!r}")


def run(index_dir: str | Path, config: ServeConfig | None = None, log_level: str = "info") -> None:
    """Load the index and its model once, then serve until interrupted."""
    import uvicorn

    from polyclip.serve.app import create_app

    config = config or ServeConfig()
    app = create_app(index_dir, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False)


__all__ = ["DynamicBatcher", "SearchService", "ServeConfig", "create_app", "run"]
