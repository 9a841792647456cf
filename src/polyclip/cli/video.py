"""``polyclip video``: ClipBERT text-video retrieval, video QA and sparse-sampling inspection.

Thin commands over ``polyclip.domains.clipbert``; the main CLI calls ``register(app)``.
Video decoding needs PyAV (``pip install av``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

Checkpoint = Annotated[
    Path,
    typer.Option(
        "--checkpoint",
        "-c",
        help="A reference ClipBERT state dict (.pt, e.g. clipbert_image_text_pretrained.pt) or a polyclip ClipBERT folder.",
    ),
]
Vocab = Annotated[
    Path | None,
    typer.Option(
        "--vocab", help="bert-base-uncased vocab.txt (or its folder); default: the checkpoint folder's."
    ),
]
Clips = Annotated[int, typer.Option("--clips", help="Clips sampled per video (the paper tests with 16).")]
Frames = Annotated[int, typer.Option("--frames", help="Frames per clip, mean-pooled by the model.")]
Fps = Annotated[float, typer.Option("--fps", help="Clip frame rate (2 for MSRVTT, 1 for ActivityNet).")]
Size = Annotated[
    int, typer.Option("--size", help="Longer frame side after resizing; frames are padded square.")
]
FramesFps = Annotated[
    float | None, typer.Option("--frames-fps", help="Images per second in frame folders (default: --fps).")
]
Aggregation = Annotated[str, typer.Option("--aggregation", help="Clip score aggregation: mean, max or lse.")]
MaxTextLength = Annotated[int, typer.Option("--max-text-length", help="Text tokens incl. [CLS] and [SEP].")]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Write the full results as JSON here.")]
PairBatch = Annotated[
    int, typer.Option("--pair-batch-size", help="(text, clip) pairs per cross-encoder pass.")
]
Bf16 = Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast (GPU: several times faster).")]


def register(app: typer.Typer) -> None:
    video_app = typer.Typer(
        name="video", help="ClipBERT video-and-language tasks (retrieval, QA).", no_args_is_help=True
    )
    video_app.command("retrieve")(retrieve)
    video_app.command("qa")(qa)
    video_app.command("sample")(sample)
    app.add_typer(video_app, name="video")


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _model_and_tokenizer(
    checkpoint: Path, vocab: Path | None, task: str, num_outputs: int | None, max_length: int, device
):
    from polyclip.domains.clipbert import BertWordPieceTokenizer, clipbert_config, load_clipbert

    config = None if checkpoint.is_dir() else clipbert_config(task, num_outputs)
    model, report = load_clipbert(checkpoint, config)
    if report.dropped:
        typer.echo(f"loaded {checkpoint} ({len(report.dropped)} unused reference tensors skipped)", err=True)
    if vocab is None:
        if not (checkpoint.is_dir() and (checkpoint / "vocab.txt").is_file()):
            raise FileNotFoundError(
                "--vocab is needed: the checkpoint carries no vocab.txt (use bert-base-uncased's)"
            )
        vocab = checkpoint / "vocab.txt"
    tokenizer = BertWordPieceTokenizer(vocab, max_length=max_length)
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise ValueError(
            f"the vocabulary has {tokenizer.vocab_size} tokens, the model {model.config.text.vocab_size} embeddings"
        )
    return model.to(device), tokenizer


def _sampling(clips: int, frames: int, fps: float, size: int):
    from polyclip.domains.clipbert import SparseSamplingConfig, VideoPreprocessConfig

    return SparseSamplingConfig(num_clips=clips, num_frames=frames, target_fps=fps), VideoPreprocessConfig(
        max_size=size
    )


def retrieve(
    checkpoint: Checkpoint,
    videos: Annotated[Path, typer.Option("--videos", help="Folder of video files and/or frame sub-folders.")],
    queries: Annotated[
        Path,
        typer.Option(
            "--queries", help='.txt (a query per line) or .jsonl {"text", "video"} (video enables metrics).'
        ),
    ],
    vocab: Vocab = None,
    task: Annotated[
        str,
        typer.Option("--task", help="Head of a reference .pt: pretrained (ITM) or retrieval (fine-tuned)."),
    ] = "pretrained",
    clips: Clips = 16,
    frames: Frames = 2,
    fps: Fps = 2.0,
    size: Size = 448,
    frames_fps: FramesFps = None,
    aggregation: Aggregation = "lse",
    max_text_length: MaxTextLength = 20,
    top_k: Annotated[int, typer.Option("--top-k", help="Videos listed per query.")] = 5,
    pair_batch_size: PairBatch = 64,
    bf16: Bf16 = False,
    device: Device = None,
    out: Out = None,
) -> None:
    """Rank the videos of a folder for each text query with ClipBERT's matching score."""
    from polyclip.domains.clipbert import (
        VideoRetrievalConfig,
        load_video_clips,
        retrieval_metrics,
        score_videos,
    )
    from polyclip.domains.clipbert.data import list_videos, read_queries, video_name

    if task not in ("pretrained", "retrieval"):
        raise ValueError(f"--task must be pretrained or retrieval for retrieval, got {task!r}")
    if top_k < 1:
        raise ValueError("--top-k must be positive")
    device = _device(device)
    sampling, preprocess = _sampling(clips, frames, fps, size)
    config = VideoRetrievalConfig(aggregation=aggregation, pair_batch_size=pair_batch_size, bf16=bf16)
    video_paths = list_videos(videos)
    names = [video_name(p) for p in video_paths]
    query_file = read_queries(queries)
    truth = None
    if query_file.videos is not None:
        unknown = sorted(set(query_file.videos) - set(names))
        if unknown:
            raise ValueError(f"queries name videos that are not in {videos}: {unknown[:10]}")
        truth = [names.index(v) for v in query_file.videos]
    model, tokenizer = _model_and_tokenizer(checkpoint, vocab, task, None, max_text_length, device)
    texts = tokenizer(query_file.texts)

    def pixels():
        for path in video_paths:
            yield load_video_clips(path, sampling, preprocess, frames_fps=frames_fps).pixels

    def progress(done: int) -> None:
        typer.echo(f"\rscored {done}/{len(video_paths)} videos", nl=done == len(video_paths), err=True)

    scores = score_videos(model, pixels(), texts, config, progress)  # (queries, videos)
    k = min(top_k, len(names))
    ranked = scores.topk(k, dim=1)
    results = []
    for row, text in enumerate(query_file.texts):
        top = [
            {"video": names[i], "score": round(float(s), 6)}
            for s, i in zip(ranked.values[row].tolist(), ranked.indices[row].tolist())
        ]
        results.append({"query": text, "top": top})
        typer.echo(f"{text}\n  " + "\n  ".join(f"{t['score']:.4f}  {t['video']}" for t in top))
    report: dict = {"videos": names, "queries": results, "scores": scores.tolist()}
    if truth is not None:
        summary = retrieval_metrics(scores, truth, recall_ks=(1, 5, 10)).summary()
        report["metrics"] = summary
        typer.echo("  ".join(f"{key} {value:.4f}" for key, value in summary.items()))
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {out}")


def qa(
    checkpoint: Checkpoint,
    questions: Annotated[
        Path,
        typer.Option(
            "--questions",
            help='.txt (a question per line) or .jsonl {"question", "video", "options", "answer"}.',
        ),
    ],
    video: Annotated[
        Path | None, typer.Option("--video", help="The video (file or frame folder) every question is about.")
    ] = None,
    videos: Annotated[
        Path | None,
        typer.Option("--videos", help="Folder of videos, for .jsonl questions that name their video."),
    ] = None,
    answers: Annotated[
        Path | None,
        typer.Option("--answers", help="Answer vocabulary of an open-ended model: ans2label.json."),
    ] = None,
    vocab: Vocab = None,
    clips: Clips = 16,
    frames: Frames = 2,
    fps: Fps = 2.0,
    size: Size = 448,
    frames_fps: FramesFps = None,
    aggregation: Aggregation = "lse",
    max_text_length: MaxTextLength = 40,
    pair_batch_size: PairBatch = 64,
    bf16: Bf16 = False,
    device: Device = None,
    out: Out = None,
) -> None:
    """Answer questions about videos: open-ended (answer vocabulary) or multiple choice (options)."""
    from polyclip.domains.clipbert import (
        QAConfig,
        answer_multiple_choice,
        answer_open_ended,
        load_answer_vocabulary,
        load_video_clips,
        qa_accuracy,
    )
    from polyclip.domains.clipbert.data import list_videos, read_questions, video_name

    question_file = read_questions(questions)
    multiple_choice = question_file.options is not None
    if (video is None) == (videos is None):
        raise ValueError(
            "give exactly one of --video (one video) or --videos (a folder, with .jsonl 'video' fields)"
        )
    if videos is not None:
        if question_file.videos is None:
            raise ValueError("--videos needs a .jsonl questions file whose records name their 'video'")
        by_name = {video_name(p): p for p in list_videos(videos)}
        unknown = sorted(set(question_file.videos) - set(by_name))
        if unknown:
            raise ValueError(f"questions name videos that are not in {videos}: {unknown[:10]}")
        targets = [by_name[name] for name in question_file.videos]
    else:
        targets = [video] * len(question_file.questions)
    answer_list = None
    if not multiple_choice:
        if answers is None:
            raise ValueError("open-ended questions need --answers (the model's ans2label.json)")
        answer_list = load_answer_vocabulary(answers)
    task = "multiple_choice" if multiple_choice else "qa"
    num_outputs = None if multiple_choice else len(answer_list)
    model, tokenizer = _model_and_tokenizer(
        checkpoint, vocab, task, num_outputs, max_text_length, _device(device)
    )
    sampling, preprocess = _sampling(clips, frames, fps, size)
    config = QAConfig(aggregation=aggregation, pair_batch_size=pair_batch_size, bf16=bf16)

    predictions: list[str | int] = [""] * len(targets)
    for target in dict.fromkeys(targets):  # each video once, with all of its questions
        rows = [i for i, t in enumerate(targets) if t == target]
        pixels = load_video_clips(target, sampling, preprocess, frames_fps=frames_fps).pixels
        asked = [question_file.questions[i] for i in rows]
        if multiple_choice:
            result = answer_multiple_choice(
                model, tokenizer, pixels, asked, [question_file.options[i] for i in rows], config
            )
        else:
            result = answer_open_ended(model, tokenizer, pixels, asked, answer_list, config)
        for row, answer, index in zip(rows, result.answers, result.predicted):
            predictions[row] = answer
            typer.echo(
                f"{question_file.questions[row]}\n  -> {answer}"
                + (f" (option {index})" if multiple_choice else "")
            )
    report: dict = {
        "questions": [{"question": q, "answer": a} for q, a in zip(question_file.questions, predictions)]
    }
    if question_file.answers is not None:
        truth = question_file.answers
        if multiple_choice:  # an index or the option text
            truth = [
                o[t] if isinstance(t, int) and 0 <= t < len(o) else t
                for t, o in zip(truth, question_file.options)
            ]
        report["accuracy"] = qa_accuracy(predictions, [str(t) for t in truth])
        typer.echo(f"accuracy {report['accuracy']:.4f} ({len(truth)} questions)")
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
        typer.echo(f"wrote {out}")


def sample(
    video: Annotated[Path, typer.Argument(help="A video file or a folder of frame images.")],
    clips: Clips = 16,
    frames: Frames = 2,
    fps: Fps = 2.0,
    frames_fps: FramesFps = None,
    mode: Annotated[
        str, typer.Option("--mode", help="uniform (inference) or random (training).")
    ] = "uniform",
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of random sampling.")] = None,
) -> None:
    """Show which frames sparse sampling picks from a video."""
    from polyclip.domains.clipbert import SparseSamplingConfig, clip_frame_indices, probe_video
    from polyclip.domains.clipbert.video import list_frame_files

    sampling = SparseSamplingConfig(num_clips=clips, num_frames=frames, target_fps=fps)
    if video.is_dir():
        num_frames, video_fps = len(list_frame_files(video)), frames_fps or fps
    else:
        info = probe_video(video)
        num_frames, video_fps = info.num_frames, info.fps
        typer.echo(f"{video}: {info.num_frames} frames at {info.fps:g} fps, {info.width}x{info.height}")
    indices = clip_frame_indices(num_frames, video_fps, sampling, mode, seed)
    for clip, row in enumerate(indices.tolist()):
        typer.echo(f"clip {clip}: frames {row}")
