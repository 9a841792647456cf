"""The web page end to end in headless Chromium (Debian's chromium driven by Playwright): a text query
and an image upload against a real `polyclip serve` subprocess; the grid must show scores and
thumbnails. A screenshot is saved (to $POLYCLIP_SCREENSHOT_DIR as well, when set)."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers live in tests/
from conftest import free_port, spawn_polyclip  # noqa: E402
from test_index_support import make_shapes, tiny_encoder, tiny_model_dir, write_captions  # noqa: E402, F401

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
    ),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_encoder):
    pytest.importorskip("faiss")
    httpx = pytest.importorskip("httpx")
    from polyclip.index import BuildOptions, Index, add_paths
    from polyclip.index.build import collect_inputs

    root = tmp_path_factory.mktemp("page")
    images = make_shapes(root / "images", 18)
    captions = write_captions(root / "captions.jsonl", images)
    paths, annotations, _ = collect_inputs([root / "images"], captions)
    with Index.create(root / "index", tiny_encoder.identity) as index:
        add_paths(index, tiny_encoder, paths, annotations, BuildOptions(batch_size=8, progress=False))
    port = free_port()
    log = open(root / "server.log", "w")
    process = spawn_polyclip(
        "serve", root / "index", "--host", "127.0.0.1", "--port", str(port), stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {(root / 'server.log').read_text()}")
        try:
            if httpx.get(base + "health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start: {(root / 'server.log').read_text()}")
        time.sleep(0.3)
    yield base, images
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def test_search_page_text_and_image_queries(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    base, images = server
    console_errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 800},
        )
        try:
            page = context.new_page()
            page.on(
                "console", lambda message: message.type == "error" and console_errors.append(message.text)
            )
            page.goto(base)
            sync_api.expect(page.locator("#summary")).to_contain_text("18 items")

            page.fill("#query", "a red circle")
            page.press("#query", "Enter")
            sync_api.expect(page.locator("#status-text")).to_contain_text("results for")
            cards = page.locator("#results .card")
            sync_api.expect(cards).to_have_count(18)
            check_grid(page, cards)

            query_image = images[4]
            page.set_input_files("#image-input", str(query_image))
            sync_api.expect(page.locator("#status-text")).to_contain_text(f"results for {query_image.name}")
            check_grid(page, cards)
            first = cards.first
            assert first.locator(".name").inner_text() == query_image.name  # the image finds itself
            assert first.locator(".score").inner_text() == "1.000"
            assert page.locator("#query-image").is_visible()

            shot = tmp_path / "search-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("POLYCLIP_SCREENSHOT_DIR"):
                shutil.copy(shot, Path(os.environ["POLYCLIP_SCREENSHOT_DIR"]) / shot.name)
        finally:
            context.close()
    assert console_errors == []


def check_grid(page, cards) -> None:
    """Every card shows a score and a decoded thumbnail."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    scores = [float(text) for text in cards.locator(".score").all_inner_texts()]
    assert all(re.fullmatch(r"-?\d\.\d{3}", text) for text in cards.locator(".score").all_inner_texts())
    assert scores == sorted(scores, reverse=True)
    widths = page.eval_on_selector_all("#results .card img", "imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == cards.count() and min(widths) > 0
