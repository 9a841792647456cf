"""`polyclip index` as a user runs it: build with captions, info, search, add, remove, and a real
SIGKILL in the middle of a build followed by a rerun that must give exactly the full collection."""

# ruff: noqa: F811  (pytest fixtures imported from test_index_support are redefined as arguments)
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SELF_SCORE_TOLERANCE, child_env, run_polyclip, spawn_polyclip
from test_index_support import make_images, other_model_dir, tiny_encoder, tiny_model_dir, write_captions  # noqa: F401

pytest.importorskip("faiss")

from polyclip.cli import app  # noqa: E402
from polyclip.index import Index  # noqa: E402

runner = CliRunner()


def count_items(database: Path) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_cli_build_info_search_add_remove(tmp_path, tiny_model_dir, other_model_dir):
    images = make_images(tmp_path / "images", 10)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    captions = write_captions(tmp_path / "captions.jsonl", images)
    out = tmp_path / "index"
    args = ["index", "build", str(tmp_path / "images"), "--model", str(tiny_model_dir), "--out", str(out)]
    result = runner.invoke(app, [*args, "--captions", str(captions), "-q", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "indexed 10 image(s)" in result.output and "1 unreadable" in result.output
    assert "broken.jpg" in result.output

    info = json.loads(runner.invoke(app, ["index", "info", str(out), "--json"]).output)
    assert info["items"] == 10 and info["spaces"]["image"]["type"] == "flat"
    assert info["spaces"]["caption"]["vectors"] == 5 and info["failures"][0][0].endswith("broken.jpg")

    found = runner.invoke(app, ["index", "search", str(out), "--image", str(images[4]), "-k", "2", "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.output)
    assert hits[0]["path"] == str(images[4].resolve()) and hits[0]["score"] == pytest.approx(
        1.0, abs=SELF_SCORE_TOLERANCE
    )
    filtered = runner.invoke(
        app, ["index", "search", str(out), "-t", "x", "-k", "10", "--filter", '{"split": "test"}', "--json"]
    )
    assert {h["metadata"]["split"] for h in json.loads(filtered.output)} == {"test"}

    more = make_images(tmp_path / "more", 3, seed=9)
    result = runner.invoke(app, ["index", "add", str(out), str(tmp_path / "more"), "-q"])
    assert result.exit_code == 0, result.output
    assert "added 3 image(s)" in result.output and "13 item(s)" in result.output
    with Index(out) as index:
        new_id = next(r.id for r in index.store.list_items(limit=100) if r.path == str(more[1].resolve()))

    result = runner.invoke(app, ["index", "remove", str(out), str(new_id), "1"])
    assert result.exit_code == 0 and "11 left" in result.output
    with Index(out) as index:
        assert index.get(new_id) is None and len(index) == 11

    result = runner.invoke(app, ["index", "remove", str(out), "99999"])
    assert result.exit_code != 0 and "no item with id 99999" in str(result.exception)
    # another model into the same folder is refused, naming what differs
    result = runner.invoke(
        app, ["index", "build", str(tmp_path / "more"), "--model", str(other_model_dir), "--out", str(out)]
    )
    assert result.exit_code != 0 and "weights differ" in str(result.exception)


def test_kill_during_build_then_rerun_gives_the_full_collection(tmp_path, tiny_model_dir, tiny_encoder):
    """SIGKILL a real `polyclip index build` after some batches are committed; the rerun completes the
    collection with every readable file exactly once and vectors equal to a direct embedding."""
    images = make_images(tmp_path / "images", 60, size=(200, 160))
    (tmp_path / "images" / "zz-broken.png").write_bytes(b"garbage")
    out = tmp_path / "index"
    args = [
        "index", "build", tmp_path / "images", "--model", tiny_model_dir, "--out", out,
        "--batch-size", "2", "--workers", "1", "-q",
    ]  # fmt: skip
    process = spawn_polyclip(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and process.poll() is None:
        committed = count_items(out / "metadata.sqlite")
        if committed >= 6:
            process.send_signal(signal.SIGKILL)
            killed_at = committed
            break
        time.sleep(0.02)
    process.wait(timeout=30)
    assert killed_at is not None, (
        f"the build ended before it could be killed: {process.stderr.read().decode()}"
    )
    assert process.returncode == -signal.SIGKILL
    partial = count_items(out / "metadata.sqlite")
    assert killed_at <= partial < len(images), "the kill should land in the middle of the build"

    rerun = run_polyclip(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert (
        f"indexed {len(images) - partial} image(s); {partial} already indexed; 1 unreadable" in rerun.stdout
    )

    database = sqlite3.connect(out / "metadata.sqlite")
    paths = [row[0] for row in database.execute("SELECT path FROM items")]
    assert sorted(paths) == sorted(str(p.resolve()) for p in images)  # all, once each
    adds = database.execute(
        "SELECT item_id, COUNT(*) FROM changes GROUP BY item_id HAVING COUNT(*) != 1"
    ).fetchall()
    assert adds == []
    with Index(out) as index:
        assert index.describe()["spaces"]["image"]["vectors"] == len(images)
        for probe in (images[0], images[partial - 1], images[partial], images[-1]):
            hits = index.search(tiny_encoder.encode_images([probe]), k=2)[0]
            assert hits[0].path == str(probe.resolve()) and hits[0].score == pytest.approx(
                1.0, abs=SELF_SCORE_TOLERANCE
            )
        ids, stored = index.stored_vectors([r.id for r in index.store.list_items(limit=200)])
        records = index.store.get_items(ids.tolist())
        direct = tiny_encoder.encode_images([records[i].path for i in ids.tolist()]).vectors
        np.testing.assert_allclose(stored, direct, rtol=2**-11, atol=1e-6)  # float16 storage


@pytest.mark.slow
def test_torchrun_two_ranks_shard_and_merge(tmp_path, tiny_model_dir):
    """torchrun with 2 processes: each rank embeds half into its shard, rank 0 merges (gloo barrier)."""
    images = make_images(tmp_path / "images", 21)
    captions = write_captions(tmp_path / "captions.jsonl", images)
    (tmp_path / "images" / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "index"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "polyclip", "index", "build",
        str(tmp_path / "images"), "--model", str(tiny_model_dir), "--out", str(out),
        "--captions", str(captions), "--batch-size", "4", "-q",
    ]  # fmt: skip
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "indexed 21 image(s); 0 already indexed; 1 unreadable; 21 item(s)" in result.stdout
    assert not (out / "shards").exists()
    with Index(out) as index:
        described = index.describe()
        assert described["items"] == 21 and described["spaces"]["caption"]["vectors"] == 11
        assert sorted(r.path for r in index.store.list_items(limit=100)) == sorted(
            str(p.resolve()) for p in images
        )
        assert index.store.failures()[0][0].endswith("broken.png")
    again = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "indexed 0 image(s); 21 already indexed" in again.stdout
