"""``polyclip video``: ClipBERT text-video retrieval, video QA and sparse-sampling inspection.

Thin commands over ``polyclip.domains.clipbert``; the main CLI calls ``register(app)``.
Video decoding needs PyAV (``pip install av``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polyclip.cli.options import choices

# the names polyclip.domains.clipbert.AGGREGATIONS and the retrieval heads accept (kept in step by a test)
AggregationChoice = choices("AggregationChoice", ("mean", "max", "lse"))
RetrievalTask = choices("RetrievalTask", ("pretrained", "retrieval"))
SamplingMode = choices("SamplingMode", ("uniform", "random"))

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
Aggregation = Annotated[
    AggregationChoice, typer.Option("--aggregation", help="Clip score aggregation over the sampled clips.")
]
MaxTextLength = Annotated[int, typer.Option("--max-text-length", help="Text tokens incl. [CLS] and [SEP].")]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Write the full results as JSON here.")]
PairBatch = Annotated[
    int, typer.Option("--pair-batch-size", help="(text, clip) pairs per cross-encoder pass.")
]
Bf16 = Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast (GPU: several times faster).")]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the full results as JSON instead of text.")]


def register(app: typer.Typer) -> None:
    video_app = typer.Typer(
        name="video", help="ClipBERT video-and-language tasks (retrieval, QA).", no_args_is_help=True
    )
    video_app.command("retrieve")(retrieve)
    video_app.command("qa")(qa)
    video_app.command("sample")(sample)
    app.add_typer(video_app, name="video")


def _model_and_tokenizer(checkpoint, vocab, task, num_outputs, max_length, device):
    from polyclip.domains.clipbert.tasks import load_task_model

    model, tokenizer, report = load_task_model(checkpoint, vocab, task, num_outputs, max_length, device)
    if report.dropped:
        typer.echo(f"loaded {checkpoint} ({len(report.dropped)} unused reference tensors skipped)", err=True)
    return model, tokenizer


def _sampling(clips: int, frames: int, fps: float, size: int):
    from polyclip.domains.clipbert import SparseSamplingConfig, VideoPreprocessConfig

    return SparseSamplingConfig(num_clips=clips, num_frames=frames, target_fps=fps), VideoPreprocessConfig(
        max_size=size
    )


def _write(out: Path | None, report: dict, json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
        if not json_output:
            typer.echo(f"wrote {out}")


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
        RetrievalTask,
        typer.Option("--task", help="Head of a reference .pt: pretrained (ITM) or retrieval (fine-tuned)."),
    ] = "pretrained",
    clips: Clips = 16,
    frames: Frames = 2,
    fps: Fps = 2.0,
    size: Size = 448,
    frames_fps: FramesFps = None,
    aggregation: Aggregation = "lse",
    max_text_length: MaxTextLength = 20,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Videos listed per query.")] = 5,
    pair_batch_size: PairBatch = 64,
    bf16: Bf16 = False,
    device: Device = None,
    out: Out = None,
    json_output: JsonOutput = False,
) -> None:
    """Rank the videos of a folder for each text query with ClipBERT's matching score."""
    from polyclip.domains.clipbert import VideoRetrievalConfig
    from polyclip.domains.clipbert.tasks import retrieve_videos

    model, tokenizer = _model_and_tokenizer(checkpoint, vocab, str(task), None, max_text_length, device)
    sampling, preprocess = _sampling(clips, frames, fps, size)
    config = VideoRetrievalConfig(aggregation=str(aggregation), pair_batch_size=pair_batch_size, bf16=bf16)
    ranking = retrieve_videos(
        model, tokenizer, videos, queries, sampling, preprocess, config, top_k, frames_fps,
        progress=not json_output,
    )  # fmt: skip
    if not json_output:
        for query, top in zip(ranking.queries, ranking.top):
            typer.echo(f"{query}\n  " + "\n  ".join(f"{score:.4f}  {video}" for video, score in top))
        if ranking.metrics is not None:
            typer.echo("  ".join(f"{key} {value:.4f}" for key, value in ranking.metrics.items()))
    _write(out, ranking.to_dict(), json_output)


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
    json_output: JsonOutput = False,
) -> None:
    """Answer questions about videos: open-ended (answer vocabulary) or multiple choice (options)."""
    from polyclip.domains.clipbert import QAConfig
    from polyclip.domains.clipbert.tasks import answer_questions, plan_questions

    if (video is None) == (videos is None):
        raise ValueError(
            "give exactly one of --video (one video) or --videos (a folder, with .jsonl 'video' fields)"
        )
    plan = plan_questions(questions, video, videos, answers)
    model, tokenizer = _model_and_tokenizer(
        checkpoint, vocab, plan.task, plan.num_outputs, max_text_length, device
    )
    sampling, preprocess = _sampling(clips, frames, fps, size)
    config = QAConfig(aggregation=str(aggregation), pair_batch_size=pair_batch_size, bf16=bf16)
    result = answer_questions(
        model, tokenizer, plan, sampling, preprocess, config, frames_fps, progress=not json_output
    )
    if not json_output:
        for row, (question, answer) in enumerate(zip(result.questions, result.answers)):
            option = f" (option {result.options[row]})" if result.options is not None else ""
            typer.echo(f"{question}\n  -> {answer}{option}")
        if result.accuracy is not None:
            typer.echo(f"accuracy {result.accuracy:.4f} ({len(result.truth)} questions)")
    _write(out, result.to_dict(), json_output)


def sample(
    video: Annotated[Path, typer.Argument(help="A video file or a folder of frame images.")],
    clips: Clips = 16,
    frames: Frames = 2,
    fps: Fps = 2.0,
    frames_fps: FramesFps = None,
    mode: Annotated[
        SamplingMode, typer.Option("--mode", help="uniform (inference) or random (training).")
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
    indices = clip_frame_indices(num_frames, video_fps, sampling, str(mode), seed)
    for clip, row in enumerate(indices.tolist()):
        typer.echo(f"clip {clip}: frames {row}")
