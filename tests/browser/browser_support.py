"""Shared set-up of the browser tests (imported by the test modules; no conftest.py here, so that `from conftest import` in tests/ finds the one there): Debian's chromium driven by Playwright, a collection of shapes
indexed with the tiny model, and `polyclip serve` run as a real subprocess."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers live in tests/
from conftest import free_port  # noqa: E402
from test_index_support import (  # noqa: E402, F401
    build_captioned_index,
    make_shapes,
    tiny_encoder,
    tiny_model_dir,
    write_captions,
)

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


# every browser test module sets `pytestmark = BROWSER`
BROWSER = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
    ),
]


@pytest.fixture(scope="session")
def collection(tmp_path_factory, tiny_encoder):
    """18 shapes with captions, indexed: (index folder, image paths)."""
    pytest.importorskip("faiss")

    root = tmp_path_factory.mktemp("page")
    images = make_shapes(root / "images", 18)
    build_captioned_index(root, tiny_encoder, images, root / "images")
    return root / "index", images


@contextlib.contextmanager
def polyclip_server(index_dir: Path, log_file: Path, *options: str):
    """``polyclip serve INDEX`` on a free port until the block ends; yields its base URL."""
    httpx = pytest.importorskip("httpx")
    port = free_port()
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "polyclip",
                "serve",
                str(index_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 180
            while True:
                if process.poll() is not None:
                    pytest.fail(f"the server exited: {log_file.read_text()}")
                try:
                    if httpx.get(base + "health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not start: {log_file.read_text()}")
                time.sleep(0.3)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def chromium(profile: Path, console_errors: list[str]):
    """A fresh headless Chromium; yields a page whose console errors are collected."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
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
            page.on("pageerror", lambda error: console_errors.append(str(error)))
            yield page
        finally:
            context.close()
