"""``polyclip medvqa train | evaluate | answer``: PubMedCLIP's medical VQA (``polyclip.domains.medvqa``).

Thin commands: read the question files, call the Python API, print or write the results. The main CLI
calls ``register(app)``; errors of the API are ``ValueError``s, which it reports in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polyclip.cli.options import JsonOutput

Images = Annotated[Path, typer.Option("--images", help="Folder the records' image names are relative to.")]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", help="Questions per step (default: 32, the reference's).")
]
Language = Annotated[
    str, typer.Option("--language", help="SLAKE: keep questions of this q_lang ('all' keeps every one).")
]


def register(app: typer.Typer) -> None:
    """Add the ``medvqa`` command group to the main CLI."""
    group = typer.Typer(
        name="medvqa",
        help="Medical visual question answering (PubMedCLIP: MEVF + bilinear attention).",
        no_args_is_help=True,
    )
    group.command("train")(train_command)
    group.command("evaluate")(evaluate_command)
    group.command("answer")(answer_command)
    app.add_typer(group)


def _language(value: str) -> str | None:
    return None if value == "all" else value


def train_command(
    train_file: Annotated[Path, typer.Option("--train", help="Training question file (VQA-RAD/SLAKE JSON).")],
    images: Images,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder the trained model is saved to.")],
    clip: Annotated[
        str, typer.Option("--clip", help="CLIP checkpoint for polyclip.load (name or path).")
    ] = "pubmedclip",
    preprocess: Annotated[
        str | None,
        typer.Option(
            "--preprocess", help="Preprocessing preset for the CLIP tower (e.g. pubmedclip for a .pth file)."
        ),
    ] = None,
    glove: Annotated[
        Path | None, typer.Option("--glove", help="GloVe text file (e.g. glove.6B.300d.txt) or aligned .npy.")
    ] = None,
    dictionary: Annotated[
        Path | None,
        typer.Option(
            "--dictionary", help="Fixed question dictionary (JSON list of words), e.g. for an aligned .npy."
        ),
    ] = None,
    eval_file: Annotated[
        Path | None, typer.Option("--eval", help="Question file evaluated each epoch (best epoch kept).")
    ] = None,
    tfidf: Annotated[
        bool,
        typer.Option(
            "--tfidf/--no-tfidf",
            help="The tf-idf smoothed second embedding (600-d input, the reference's --op c).",
        ),
    ] = True,
    answers: Annotated[
        str,
        typer.Option(
            "--answers",
            help="Answer vocabulary from 'train' (default) or 'trainval': train + --eval answers, the paper's protocol.",
        ),
    ] = "train",
    rnn: Annotated[str, typer.Option("--rnn", help="lstm (MEVF's default) or gru.")] = "lstm",
    hidden_dim: Annotated[int, typer.Option("--hidden-dim", help="RNN, BAN and joint size.")] = 1024,
    autoencoder_size: Annotated[
        int, typer.Option("--autoencoder-size", help="Side of the autoencoder's grey input (MEVF: 128).")
    ] = 128,
    autoencoder_weights: Annotated[
        Path | None, typer.Option("--autoencoder-weights", help="MEVF's pretrained_ae.pth.")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs")] = 20,
    batch_size: BatchSize = None,
    lr: Annotated[float, typer.Option("--lr", help="Base learning rate (warm-up doubles it).")] = 0.002,
    optimizer: Annotated[
        str, typer.Option("--optimizer", help="adamax (the reference's) or adamw.")
    ] = "adamax",
    freeze_clip: Annotated[
        bool, typer.Option("--freeze-clip", help="Keep the CLIP tower's weights.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed")] = 1204,
    workers: Annotated[int, typer.Option("--workers", help="Data loading processes.")] = 0,
    device: Device = None,
    language: Language = "en",
) -> None:
    """Train a medical VQA model on a question file and save it."""
    from polyclip.domains.medvqa import MedVQA, TrainConfig, load_records, train
    from polyclip.domains.medvqa.text import read_dictionary

    config = TrainConfig(
        epochs=epochs, batch_size=batch_size or 32, lr=lr, optimizer=optimizer, freeze_clip=freeze_clip,
        seed=seed, device=device, num_workers=workers,
    )  # fmt: skip
    records = load_records(train_file, _language(language))
    eval_records = load_records(eval_file, _language(language)) if eval_file else None
    if answers not in ("train", "trainval"):
        raise ValueError(f"--answers is 'train' or 'trainval', got {answers!r}")
    if answers == "trainval" and not eval_records:
        raise ValueError("--answers trainval (the paper's protocol) needs the test questions as --eval")
    vqa = MedVQA.build(
        clip, records, word_vectors=glove, autoencoder_weights=autoencoder_weights,
        dictionary=read_dictionary(dictionary) if dictionary else None, preprocess=preprocess,
        tfidf_embedding=tfidf, rnn=rnn, hidden_dim=hidden_dim, autoencoder_size=autoencoder_size,
        answer_records=[*records, *eval_records] if answers == "trainval" else None,
    )  # fmt: skip
    train_set = vqa.dataset(records, images)
    eval_set = vqa.dataset(eval_records, images) if eval_records else None
    typer.echo(
        f"{len(records)} questions, {len(vqa.dictionary)} words, {len(vqa.answers)} answers, "
        f"{sum(p.numel() for p in vqa.model.parameters()):,} parameters"
    )
    result = train(vqa, train_set, eval_set, config, log=typer.echo, progress=True)
    vqa.save(out)
    (Path(out) / "history.json").write_text(json.dumps(result.history, indent=1), encoding="utf-8")
    if result.best_epoch is not None:
        typer.echo(f"best epoch {result.best_epoch}: overall accuracy {result.best_accuracy:.4f}")
    typer.echo(f"saved to {out}")


def evaluate_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Question file (VQA-RAD/SLAKE JSON); with --reference-checkpoint, the reference's data folder.",
        ),
    ],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="A folder saved by 'medvqa train'.")
    ] = None,
    reference_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--reference-checkpoint",
            help="A model saved by PubMedCLIP's own trainer (MEVF_PubMedCLIP, BAN --clip --autoencoder).",
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images", help="Folder the records' image names are relative to (default: DATA/images)."
        ),
    ] = None,
    questions: Annotated[
        str, typer.Option("--questions", help="With --reference-checkpoint: the question file in DATA.")
    ] = "testset.json",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write accuracies and every prediction to this JSON file."),
    ] = None,
    batch_size: BatchSize = None,
    device: Device = None,
    language: Language = "en",
) -> None:
    """Accuracy on closed, open and all questions (and per question type)."""
    from polyclip.domains.medvqa import MedVQA, evaluate, load_records

    if (model is None) == (reference_checkpoint is None):
        raise ValueError("give either --model (a folder saved by 'medvqa train') or --reference-checkpoint")
    if reference_checkpoint is not None:
        vqa = MedVQA.from_reference(reference_checkpoint, data).to(device or "cpu")
        question_file = data / questions
        image_root = images or data / "images"
    else:
        vqa = MedVQA.load(model, device=device)
        question_file = data
        if images is None:
            raise ValueError("--images is required with --model")
        image_root = images
    records = load_records(question_file, _language(language))
    result = evaluate(vqa, vqa.dataset(records, image_root), batch_size=batch_size or 64, progress=True)
    report = result.report
    for name, value in (("overall", report.overall), ("closed", report.closed), ("open", report.open)):
        shown = "n/a" if value is None else f"{100 * value:.1f}%"
        typer.echo(f"{name:8s} {shown:>7s}  ({report.counts[name]} questions)")
    for name, value in report.by_question_type.items():
        typer.echo(f"  {name:14s} {100 * value:.1f}%")
    if out is not None:
        payload = {"accuracy": report.to_dict(), "predictions": result.predictions}
        out.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        typer.echo(f"wrote {out}")


def answer_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="A folder saved by 'medvqa train'.")],
    image: Annotated[Path, typer.Option("--image", help="The image the question is about.")],
    question: Annotated[str, typer.Option("--question", "-q", help="The question.")],
    device: Device = None,
    json_output: JsonOutput = False,
) -> None:
    """Answer one question about one image."""
    from polyclip.domains.medvqa import MedVQA

    answer, score = MedVQA.load(model, device=device).answer(image, question)
    if json_output:
        typer.echo(json.dumps({"answer": answer, "score": score}))
    else:
        typer.echo(f"{answer}\t{score:.4f}")


__all__ = ["register"]
