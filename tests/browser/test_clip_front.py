"""clip-retrieval's front end (clip-front, as built in the clip-retrieval wheel), served statically
from its own origin, driven in headless Chromium against a `polyclip serve --cors-origin` back end:
its search shows result images loaded from polyclip's thumbnails."""

# ruff: noqa: F811  (fixtures imported from browser_support are redefined as arguments)
from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from browser_support import (  # noqa: F401  (fixtures)
    BROWSER,
    chromium,
    collection,
    free_port,
    polyclip_server,
    tiny_encoder,
    tiny_model_dir,
)

pytestmark = BROWSER


def front_build() -> Path:
    """The built front end the wheel installs beside the package (site-packages/front/build)."""
    spec = importlib.util.find_spec("clip_retrieval")
    build = None if spec is None else Path(spec.submodule_search_locations[0]).parent / "front" / "build"
    if build is None or not (build / "index.html").is_file():
        if os.environ.get("CI"):
            raise FileNotFoundError(
                "clip-retrieval's front end is not installed (pip install --no-deps clip-retrieval)"
            )
        pytest.skip("needs clip-retrieval's front end (pip install --no-deps clip-retrieval)")
    return build


def test_clip_front_shows_polyclip_results(collection, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    index_dir, images = collection
    site = tmp_path / "front"
    shutil.copytree(front_build(), site)
    front_port = free_port()
    front_origin = f"http://127.0.0.1:{front_port}"
    handler = functools.partial(QuietHandler, directory=str(site))
    static = http.server.ThreadingHTTPServer(("127.0.0.1", front_port), handler)
    threading.Thread(target=static.serve_forever, daemon=True).start()
    console_errors: list[str] = []
    try:
        with polyclip_server(
            index_dir, tmp_path / "server.log", "--cors-origin", front_origin, "--name", "shapes"
        ) as back:
            # clip-front reads its default back end and index from config.json beside its page
            backend = back.rstrip("/")
            (site / "config.json").write_text(
                json.dumps({"defaultBackend": backend, "defaultIndex": "shapes"})
            )
            with chromium(tmp_path / "profile", console_errors) as page:
                page.goto(f"{front_origin}/?query=a+red+circle")
                pictures = page.locator("clip-front img.pic")  # Playwright's locators pierce its shadow DOM
                sync_api.expect(pictures.first).to_be_visible(timeout=60_000)
                page.wait_for_function(
                    """() => {
                        const imgs = [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')];
                        return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
                    }""",
                    timeout=60_000,
                )
                sources = pictures.evaluate_all("imgs => imgs.map(i => i.src)")
                assert all(src.startswith(backend + "/images/") for src in sources), sources
                assert 1 <= len(sources) <= len(images)
                widths = pictures.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
                assert min(widths) > 0
                titles = pictures.evaluate_all("imgs => imgs.map(i => i.title)")
                assert any(title.startswith("picture number") for title in titles)  # captions shown
                page.screenshot(path=str(tmp_path / "clip-front.png"))
                if os.environ.get("POLYCLIP_SCREENSHOT_DIR"):
                    shutil.copy(tmp_path / "clip-front.png", Path(os.environ["POLYCLIP_SCREENSHOT_DIR"]))
    finally:
        static.shutdown()
    # the wheel's page asks for a vendor script and a favicon it does not ship: 404s of its own
    assert [error for error in console_errors if "404" not in error] == []


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        pass
