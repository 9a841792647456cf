"""Faults around files and commands: a full disk, a torn log line, paths spelled another way, a rerun on
finished work, commands that did none of their work, and Pillow's process-wide limit under threads."""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import polyclip
from polyclip.embed import parquet as embed_store
from polyclip.files import DiskFullError, read_jsonl_log, stable_path
from polyclip.images import load_image
from test_hostile_support import run_main
from test_train_fixtures import colour_pairs, write_jsonl

pq = pytest.importorskip("pyarrow.parquet")


def make_images(folder: Path, count: int = 5, broken: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (40 + i, 30), (40 * i, 100, 200 - 30 * i)).save(folder / f"img{i}.png")
    if broken:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return folder


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread on a busy machine (as in the trainer's own tests)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def forbid_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although nothing was left to embed")

    monkeypatch.setattr(polyclip, "load", refuse)


# ---------------------------------------------------------------------------------------------------------
# Pillow's global decompression-bomb limit


def test_pillow_limit_stays_intact_while_another_thread_decodes():
    original = Image.MAX_IMAGE_PIXELS
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    seen: set = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(300):
            assert load_image(data, max_pixels=None).size == (64, 48)
    finally:
        stop.set()
        watcher.join()
    assert seen == {original}


def test_own_limit_applies_per_call_without_the_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own check would refuse 64 x 48
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "PNG")
    assert load_image(buffer.getvalue()).size == (64, 48)
    with pytest.raises(ValueError, match="too large"):
        load_image(buffer.getvalue(), max_pixels=64 * 48 - 1)
    assert Image.MAX_IMAGE_PIXELS == 100


# ---------------------------------------------------------------------------------------------------------
# embed: resume under another spelling of the path, rerun on finished work


def kill_after_first_part(monkeypatch) -> None:
    real = embed_store._write_part

    def write_then_die(folder, index, *args):
        real(folder, index, *args)
        if index == 0:
            raise KeyboardInterrupt  # the process is killed after its first part reached the disk

    monkeypatch.setattr(embed_store, "_write_part", write_then_die)


@pytest.mark.parametrize("spelling", ["absolute", "dot", "symlink"])
def test_embed_killed_then_rerun_under_another_spelling_resumes(
    tiny_hf_clip_dir, tmp_path, monkeypatch, spelling
):
    folder = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "emb.parquet"
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        kill_after_first_part(patch)
        with pytest.raises(KeyboardInterrupt):
            embed_store.embed_to_parquet(
                str(tiny_hf_clip_dir), out, [Path("imgs")], None, batch_size=2, rows_per_part=2
            )
    (part,) = (tmp_path / "emb.parquet.parts").glob("part-*.parquet")
    first_rows = pq.read_table(part).num_rows
    if spelling == "symlink":
        os.symlink(folder, tmp_path / "link")
    again = {"absolute": folder.resolve(), "dot": Path("./imgs"), "symlink": tmp_path / "link"}[spelling]
    summary = embed_store.embed_to_parquet(
        str(tiny_hf_clip_dir), out, [again], None, batch_size=2, rows_per_part=2
    )
    assert summary["resumed"] == first_rows > 0 and summary["new"] == 6 - first_rows and summary["rows"] == 6
    paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(stable_path(folder / f"img{i}.png") for i in range(6))  # no duplicates


def test_embed_rerun_on_a_finished_output_is_complete(tiny_hf_clip_dir, tmp_path, monkeypatch, capsys):
    folder = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "emb.parquet"
    args = ("embed", str(folder), "--model", str(tiny_hf_clip_dir), "--out", str(out))
    code, output, _ = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "wrote 3 embeddings" in output
    before = out.read_bytes()
    with monkeypatch.context() as patch:
        forbid_loading(patch)
        code, output, _ = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "already complete: 3 embeddings" in output
    assert out.read_bytes() == before
    # a grown collection: only the new file is embedded, the finished rows are kept
    Image.new("RGB", (33, 33), (1, 2, 3)).save(folder / "new.png")
    summary = embed_store.embed_to_parquet(str(tiny_hf_clip_dir), out, [folder], None)
    assert (summary["new"], summary["resumed"], summary["rows"]) == (1, 3, 4)


def test_embed_does_not_overwrite_another_runs_output(tiny_hf_clip_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "emb.parquet"
    (tmp_path / "texts.txt").write_text("a cat\n")
    code, *_ = run_main(
        monkeypatch,
        capsys,
        "embed",
        "--text",
        str(tmp_path / "texts.txt"),
        "--model",
        str(tiny_hf_clip_dir),
        "--out",
        str(out),
    )
    assert code == 0
    folder = make_images(tmp_path / "imgs", 2)
    code, _, error = run_main(
        monkeypatch, capsys, "embed", str(folder), "--model", str(tiny_hf_clip_dir), "--out", str(out)
    )
    assert (
        code != 0
        and "already exists and holds embeddings of another run" in error
        and "Traceback" not in error
    )
    assert pq.read_table(out).column_names == ["text", "embedding"]


# ---------------------------------------------------------------------------------------------------------
# failures.jsonl with a torn last line


def test_a_torn_failure_log_line_does_not_break_the_resume(tiny_hf_clip_dir, tmp_path):
    folder = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "emb.parquet"
    parts = tmp_path / "emb.parquet.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(
        json.dumps({"model": str(tiny_hf_clip_dir.resolve()), "key": "path"})
    )
    broken = stable_path(folder / "broken.jpg")
    # a full disk cut the second record short: no closing bracket, no newline
    (parts / "failures.jsonl").write_text(
        json.dumps([broken, "cannot decode"]) + "\n" + '["/elsewhere/x.jpg", "cann'
    )
    summary = embed_store.embed_to_parquet(str(tiny_hf_clip_dir), out, [folder], None)
    assert summary["rows"] == 3 and [path for path, _ in summary["failures"]] == [broken]


def test_failure_log_is_repaired_so_appends_start_on_a_fresh_line(tmp_path):
    log = tmp_path / "failures.jsonl"
    log.write_text('["a", "x"]\n["b", "y"\n{not json}\n["c"')
    assert read_jsonl_log(log) == [["a", "x"]]
    assert log.read_text() == '["a", "x"]\n'


# ---------------------------------------------------------------------------------------------------------
# A full disk


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full")
def test_embed_on_a_full_disk_says_so_and_resumes(tiny_hf_clip_dir, tmp_path, monkeypatch, capsys):
    """For real: the first part is written to /dev/full, where every write fails with ENOSPC."""
    folder = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "emb.parquet"
    parts = tmp_path / "emb.parquet.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(
        json.dumps({"model": str(tiny_hf_clip_dir.resolve()), "key": "path"})
    )
    os.symlink("/dev/full", parts / "part-000000.parquet.tmp")
    args = ("embed", str(folder), "--model", str(tiny_hf_clip_dir), "--out", str(out))
    code, _, error = run_main(monkeypatch, capsys, *args)
    assert code != 0 and "Traceback" not in error
    assert "no space left on device while writing" in error and "part-000000.parquet.tmp" in error
    assert "free space and rerun to resume" in error
    assert [path for path, _ in read_jsonl_log(parts / "failures.jsonl")] == [
        stable_path(folder / "broken.jpg")
    ]
    (parts / "part-000000.parquet.tmp").unlink(
        missing_ok=True
    )  # space is freed (pyarrow may have removed it)
    code, output, _ = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "wrote 3 embeddings" in output


def test_embed_full_disk_while_merging_loses_no_part(tiny_hf_clip_dir, tmp_path, monkeypatch, capsys):
    folder = make_images(tmp_path / "imgs", 3, broken=False)
    out = tmp_path / "emb.parquet"
    real_write = pq.write_table

    def full_for_the_output(table, where, *args, **kwargs):
        if str(where).endswith("emb.parquet.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    args = ("embed", str(folder), "--model", str(tiny_hf_clip_dir), "--out", str(out))
    with monkeypatch.context() as patch:
        patch.setattr(pq, "write_table", full_for_the_output)
        code, _, error = run_main(monkeypatch, capsys, *args)
    assert (
        code != 0 and f"no space left on device while writing {out}; free space and rerun to resume" in error
    )
    assert list((tmp_path / "emb.parquet.parts").glob("part-*.parquet"))  # the embeddings are still there
    with monkeypatch.context() as patch:
        forbid_loading(patch)  # everything was embedded: the rerun only merges
        code, output, _ = run_main(monkeypatch, capsys, *args)
    assert code == 0 and "wrote 3 embeddings" in output and "3 from a previous run" in output


class _FullAfter(io.RawIOBase):
    """A file that accepts ``room`` bytes, then fails as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)


def test_training_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    from polyclip.train import checkpoint as ckpt

    model = polyclip.create_model("tiny-vit")
    tokenizer = types.SimpleNamespace(config={"type": "clip", "context_length": 77})

    def save(step: int):
        state = {"step": step, "optimizer": {"m": torch.zeros(1000)}}
        return ckpt.save_checkpoint(
            tmp_path, step, model.state_dict(), model.config, None, tokenizer, state, keep_last=3
        )

    first = save(1)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: real_save(obj, _FullAfter(file, 500)))
    with pytest.raises(DiskFullError) as error:
        save(2)
    assert str(error.value) == (
        f"no space left on device while writing {tmp_path / 'checkpoints' / 'step_00000002'}; "
        "free space and rerun to resume"
    )
    assert ckpt.list_checkpoints(tmp_path) == [
        first
    ]  # the earlier checkpoint is untouched and still the latest
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000001"
    ]  # no partial folder
    weights, state = ckpt.read_checkpoint(first)
    assert state["step"] == 1 and weights.keys() == model.state_dict().keys()


# ---------------------------------------------------------------------------------------------------------
# Commands that did none of their work exit non-zero


def test_classify_with_no_readable_image_fails(tiny_hf_clip_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"")
    base = ("classify", "--model", str(tiny_hf_clip_dir), "--labels", "cat,dog")
    code, _, error = run_main(monkeypatch, capsys, *base, str(tmp_path / "a.jpg"), str(tmp_path / "b.png"))
    assert code == 1 and "none of the 2 image(s) could be read" in error
    make_images(tmp_path / "ok", 1, broken=False)
    code, output, _ = run_main(
        monkeypatch, capsys, *base, str(tmp_path / "a.jpg"), str(tmp_path / "ok" / "img0.png"), "--json"
    )
    assert code == 0 and len(json.loads(output)[str(tmp_path / "ok" / "img0.png")]) == 2


def test_embed_with_no_readable_file_fails(tiny_hf_clip_dir, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code, _, error = run_main(
        monkeypatch,
        capsys,
        "embed",
        str(folder),
        "--model",
        str(tiny_hf_clip_dir),
        "--out",
        str(tmp_path / "e.parquet"),
    )
    assert code != 0 and "no input could be embedded" in error and "Traceback" not in error
    (tmp_path / "empty").mkdir()
    code, _, error = run_main(
        monkeypatch,
        capsys,
        "embed",
        str(tmp_path / "empty"),
        "--model",
        str(tiny_hf_clip_dir),
        "--out",
        str(tmp_path / "f.parquet"),
    )
    assert code != 0 and "no image files found" in error


@pytest.mark.slow  # two short training runs: ~20 s on a busy machine
def test_train_command_on_a_full_disk_exits_with_the_message_and_resumes(tmp_path, monkeypatch, capsys):
    from polyclip.train.checkpoint import list_checkpoints
    from polyclip.train.config import TrainConfig, apply_overrides

    pairs = write_jsonl(tmp_path / "pairs" / "pairs.jsonl", colour_pairs(tmp_path / "pairs", 8))
    config = TrainConfig(name="full-disk", output_dir=str(tmp_path / "run"), device="cpu")
    apply_overrides(
        config,
        [
            "model.architecture=tiny-vit", f"data.train={pairs}", "data.batch_size=4", "data.num_workers=0",
            "schedule.max_steps=4", "schedule.warmup_steps=1", "checkpoint.every_steps=2", "log.progress=false",
            "log.plots=false", "log.console=false",
        ],
    )  # fmt: skip
    (tmp_path / "config.json").write_text(config.to_json())
    real_save, saves = torch.save, []

    def full_from_the_second_save(obj, file, *args, **kwargs):
        saves.append(1)
        return real_save(obj, file if len(saves) == 1 else _FullAfter(file, 200), *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", full_from_the_second_save)
        code, _, error = run_main(monkeypatch, capsys, "train", str(tmp_path / "config.json"))
    assert code == 2 and "no space left on device while writing" in error and "step_00000004" in error
    assert "free space and rerun to resume" in error
    (kept,) = list_checkpoints(tmp_path / "run")
    assert kept.name == "step_00000002"
    code, _, error = run_main(
        monkeypatch, capsys, "train", str(tmp_path / "config.json"), "--resume", "latest"
    )
    assert code == 0, error
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_00000004"
