"""polyclip's own page end to end in headless Chromium against a real `polyclip serve` subprocess: a
sample before any search, a text query with a shareable ?q= URL, upload, drag-and-drop and paste of
an image, "more like this", keyboard navigation; the screenshot is checked (thumbnails drawn in the
result cards) and no console error is allowed. A screenshot is saved (to $POLYCLIP_SCREENSHOT_DIR as
well, when set)."""

# ruff: noqa: F811  (fixtures imported from conftest/test_index_support are redefined as arguments)
from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from browser_support import BROWSER, chromium, collection, polyclip_server, tiny_encoder, tiny_model_dir  # noqa: F401  (fixtures)
from PIL import Image

pytestmark = BROWSER


@pytest.fixture(scope="module")
def server(collection, tmp_path_factory):
    index_dir, images = collection
    with polyclip_server(index_dir, tmp_path_factory.mktemp("log") / "server.log") as base:
        yield base, images


def test_search_page(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    expect = sync_api.expect
    base, images = server
    console_errors: list[str] = []
    with chromium(tmp_path / "profile", console_errors) as page:
        # before any search: a sample of the collection, with relative paths and captions
        page.goto(base)
        expect(page.locator("#summary")).to_contain_text("18 items")
        expect(page.locator("#status-text")).to_contain_text("a sample of 18 of 18 items")
        cards = page.locator("#results .card")
        expect(cards).to_have_count(18)
        names = cards.locator(".name").all_inner_texts()
        assert sorted(names) == sorted(p.name for p in images)  # relative to the collection root
        assert cards.locator(".caption").count() == 9  # every other image has a caption

        # a text query; the URL becomes shareable
        page.fill("#query", "a red circle")
        page.press("#query", "Enter")
        expect(page.locator("#status-text")).to_contain_text("results for")
        expect(cards).to_have_count(18)
        check_grid(page, cards)
        assert "q=a+red+circle" in page.url
        ranked = cards.locator(".name").all_inner_texts()

        # the shared URL, opened afresh, shows the same results
        page.goto(base + "?q=a+red+circle")
        expect(page.locator("#status-text")).to_contain_text("results for")
        expect(cards).to_have_count(18)
        assert cards.locator(".name").all_inner_texts() == ranked
        assert page.input_value("#query") == "a red circle"

        # upload an image: it finds itself
        query_image = images[4]
        page.set_input_files("#image-input", str(query_image))
        expect(page.locator("#status-text")).to_contain_text(f"results for {query_image.name}")
        check_grid(page, cards)
        assert cards.first.locator(".name").inner_text() == query_image.name
        assert cards.first.locator(".score").inner_text() == "1.000"
        assert page.locator("#query-image").is_visible()

        # drag and drop an image onto the page, then paste one
        for event, image in (("drop", images[7]), ("paste", images[11])):
            send_image_event(page, event, image)
            expect(page.locator("#status-text")).to_contain_text("results for")
            expect(cards.first.locator(".name")).to_have_text(image.name)

        # "more like this" on the third result
        third = cards.nth(2)
        third_name = third.locator(".name").inner_text()
        third.locator(".like").click()
        expect(page.locator("#status-text")).to_contain_text(f"items like {third_name}")
        expect(cards.first.locator(".name")).to_have_text(third_name)
        assert re.search(r"like=\d+", page.url)

        # keyboard: "/" to the search box, arrows across the grid, Enter for more like this
        page.locator("body").press("Escape")
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "query"
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowRight")
        focused = page.evaluate("document.activeElement.querySelector('.name').textContent")
        assert focused == cards.nth(1).locator(".name").inner_text()
        page.keyboard.press("Enter")
        expect(page.locator("#status-text")).to_contain_text(f"items like {focused}")
        expect(cards.first.locator(".name")).to_have_text(focused)
        check_grid(page, cards)

        shot = tmp_path / "search-page.png"
        page.screenshot(path=str(shot))
        check_screenshot(page, shot)
        if os.environ.get("POLYCLIP_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["POLYCLIP_SCREENSHOT_DIR"]) / shot.name)
    assert console_errors == []


def send_image_event(page, kind: str, image: Path) -> None:
    """A drop or paste event carrying ``image`` as a file, as the browser makes them."""
    data = base64.b64encode(image.read_bytes()).decode()
    page.evaluate(
        """([kind, data, name]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            const event = kind === "drop"
                ? new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true })
                : new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true });
            document.querySelector("#results").dispatchEvent(event);
        }""",
        [kind, data, image.name],
    )


def check_grid(page, cards) -> None:
    """Every card shows a score and a decoded thumbnail, best first."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    texts = cards.locator(".score").all_inner_texts()
    assert texts and all(re.fullmatch(r"-?\d\.\d{3}", text) for text in texts)
    scores = [float(text) for text in texts]
    assert scores == sorted(scores, reverse=True)


def check_screenshot(page, shot: Path) -> None:
    """In the screenshot itself, the visible cards' thumbnails are drawn: each differs from the empty
    placeholder colour and holds the shapes' colours, not a flat area."""
    image = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(np.float32)
    boxes = page.eval_on_selector_all(
        "#results .card img",
        "imgs => imgs.map(i => i.getBoundingClientRect()).map(r => [r.left, r.top, r.right, r.bottom])",
    )
    visible = [box for box in boxes if box[3] <= image.shape[0] and box[1] >= 0]
    assert len(visible) >= 4, boxes
    placeholder = np.array([0xE9, 0xEC, 0xEF], np.float32)
    for left, top, right, bottom in visible:
        crop = image[int(top) + 2 : int(bottom) - 2, int(left) + 2 : int(right) - 2]
        assert crop.std() > 10, "a thumbnail area is flat"
        assert np.abs(crop - placeholder).sum(axis=2).mean() > 20, "a thumbnail area shows the placeholder"
