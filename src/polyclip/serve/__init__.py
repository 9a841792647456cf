"""HTTP search service over a polyclip index (FastAPI + uvicorn) and its web page.

    polyclip serve my-index --port 8000
    curl -s localhost:8000/search -H 'content-type: application/json' -d '{"text": "a red bicycle", "k": 5}'

Requires ``pip install 'polyclip[serve]'``.
"""

from __future__ import annotations

from pathlib import Path

from polyclip.serve.app import create_app
from polyclip.serve.batching import DynamicBatcher
from polyclip.serve.config import ServeConfig
from polyclip.serve.service import SearchService


def run(index_dir: str | Path, config: ServeConfig | None = None, log_level: str = "info") -> None:
    """Load the index and its model once, then serve until interrupted."""
    import uvicorn

    config = config or ServeConfig()
    app = create_app(index_dir, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=False)


__all__ = ["DynamicBatcher", "SearchService", "ServeConfig", "create_app", "run"]
