"""``polyclip eval``: the evaluation protocols of ``polyclip.eval`` from the command line.

Thin commands: parse options, call ``polyclip.eval.run_*``, write the report. ``--models a b c``
takes several models at once (one report column each); the main CLI calls ``register(app)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from polyclip.cli.options import Device, Templates, resolve_templates_option


def expand_greedy_models(args: list[str]) -> list[str]:
    """``--models a b c`` -> ``--models a --models b --models c`` (click options take one value each)."""
    out: list[str] = []
    greedy = False
    for position, arg in enumerate(args):
        if arg == "--":
            return out + args[position:]
        if arg == "--models":
            greedy, pending = True, True
            out.append(arg)
            continue
        if greedy and not arg.startswith("-"):
            if not pending:
                out.append("--models")
            out.append(arg)
            pending = False
            continue
        greedy = False
        out.append(arg)
    return out


class _ModelsCommand(TyperCommand):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_greedy_models(list(args)))


Models = Annotated[
    list[str], typer.Option("--models", "-m", help="Model names or paths for polyclip.load; several allowed.")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Report directory (results.json, results.md, plots).")]
CacheDir = Annotated[
    Path | None, typer.Option("--cache-dir", help="Feature cache directory; a second run reuses features.")
]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
Workers = Annotated[int, typer.Option("--workers", help="Image decoding processes (0 = in process).")]
NoPlots = Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")]
ClassNames = Annotated[
    str | None,
    typer.Option("--class-names", help="mnist, fashion-mnist, or a file with one class name per line."),
]


def _ints(text: str, option: str) -> tuple[int, ...]:
    from polyclip.eval.errors import EvalError

    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise EvalError(f"{option} takes comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise EvalError(f"{option} takes positive integers, got {text!r}")
    return values


def _user_errors(command: Callable) -> Callable:
    """Report ``EvalError``s as one readable line and exit status 2, without a traceback."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        # imported here, not at the top: polyclip.eval pulls in torch, and `--help` must not
        from polyclip.eval.errors import EvalError

        try:
            return command(*args, **kwargs)
        except EvalError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _run_config(cache_dir, batch_size, workers, device):
    from polyclip.eval import EncodeConfig, EvalError, RunConfig

    if batch_size < 1 or workers < 0:
        raise EvalError("--batch-size must be positive and --workers non-negative")
    encode = EncodeConfig(batch_size=batch_size, num_workers=workers, device=device, progress=True)
    return RunConfig(encode=encode, cache_dir=cache_dir)


def _finish(report, out: Path, no_plots: bool) -> None:
    from polyclip.eval import write_report

    written = write_report(report, out, plots=not no_plots)
    typer.echo(report.markdown())
    typer.echo("wrote " + ", ".join(str(path) for path in written.values()))


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command group to the main CLI."""
    eval_app = typer.Typer(
        name="eval", help="Evaluate models with the papers' protocols.", no_args_is_help=True
    )
    command = eval_app.command

    @command("templates", help="List the built-in prompt template sets.")
    def templates_command() -> None:
        from polyclip.eval import list_template_sets

        for name, templates in list_template_sets().items():
            typer.echo(f"{name} ({len(templates)} templates): {templates[0]}")

    @command("zeroshot", cls=_ModelsCommand, help="Zero-shot classification: top-1/5, balanced accuracy, F1.")
    @_user_errors
    def zeroshot_command(
        models: Models,
        data: Annotated[
            Path,
            typer.Option(
                "--data", help="Image folder, CSV (path,label), dataset_rsicd.json or idx images file."
            ),
        ],
        out: Out,
        labels: Annotated[
            Path | None, typer.Option("--labels", help="idx labels file (default: guessed).")
        ] = None,
        class_names: ClassNames = None,
        image_root: Annotated[
            Path | None, typer.Option("--image-root", help="Image folder of a dataset_rsicd.json.")
        ] = None,
        protocol: Annotated[
            str | None,
            typer.Option(
                "--protocol",
                help="A system's own protocol: clip, clip-rsicd, plip, plip-tissue, fashionclip, bioclip.",
            ),
        ] = None,
        templates: Templates = None,
        top_ks: Annotated[
            str | None, typer.Option("--top-ks", help="Comma-separated k for top-k accuracy (default 1,5).")
        ] = None,
        cache_dir: CacheDir = None,
        batch_size: BatchSize = 64,
        workers: Workers = 2,
        device: Device = None,
        no_plots: NoPlots = False,
    ) -> None:
        from polyclip.eval import ZeroShotConfig, load_labeled, run_zero_shot

        ks = _ints(top_ks, "--top-ks") if top_ks is not None else None
        chosen = resolve_templates_option(templates)  # None: the protocol's own, else openai_imagenet
        if protocol is not None:
            config = ZeroShotConfig.for_protocol(protocol, templates=chosen, top_ks=ks)
        else:
            config = ZeroShotConfig(templates=chosen or "openai_imagenet", top_ks=ks or (1, 5))
        dataset = load_labeled(data, labels, class_names, image_root)
        run = _run_config(cache_dir, batch_size, workers, device)
        _finish(run_zero_shot(models, dataset, config, run), out, no_plots)

    @command("retrieval", cls=_ModelsCommand, help="Image-text retrieval: R@K, median/mean rank, P@K.")
    @_user_errors
    def retrieval_command(
        models: Models,
        captions: Annotated[Path, typer.Option("--captions", help="Captions CSV, JSONL or dataset_*.json.")],
        out: Out,
        image_root: Annotated[
            Path | None, typer.Option("--image-root", help="Folder the image paths are in.")
        ] = None,
        split: Annotated[str | None, typer.Option("--split", help="Keep one split, e.g. test.")] = None,
        recall_ks: Annotated[str, typer.Option("--recall-ks", help="Comma-separated K for R@K.")] = "1,5,10",
        precision_ks: Annotated[
            str, typer.Option("--precision-ks", help="Comma-separated K for P@K.")
        ] = "10",
        cache_dir: CacheDir = None,
        batch_size: BatchSize = 64,
        workers: Workers = 2,
        device: Device = None,
        no_plots: NoPlots = False,
    ) -> None:
        from polyclip.eval import RetrievalConfig, read_captions, run_retrieval

        dataset = read_captions(captions, image_root, split)
        config = RetrievalConfig(
            recall_ks=_ints(recall_ks, "--recall-ks"),
            precision_ks=_ints(precision_ks, "--precision-ks"),
            device=device,
        )
        run = _run_config(cache_dir, batch_size, workers, device)
        _finish(run_retrieval(models, dataset, config, run), out, no_plots)

    @command("probe", cls=_ModelsCommand, help="Linear probe on frozen features (CLIP logreg or PLIP SGD).")
    @_user_errors
    def probe_command(
        models: Models,
        train: Annotated[Path, typer.Option("--train", help="Training images (folder, CSV or idx).")],
        test: Annotated[Path, typer.Option("--test", help="Test images.")],
        out: Out,
        val: Annotated[
            Path | None, typer.Option("--val", help="Validation images (default: split off train).")
        ] = None,
        protocol: Annotated[
            str,
            typer.Option(
                "--protocol",
                help="logreg (CLIP paper) or plip (PLIP's SGD: every alpha on test, plus a held-out choice).",
            ),
        ] = "logreg",
        seed: Annotated[
            int | None, typer.Option("--seed", help="Default: the protocol's (logreg 0, plip 1).")
        ] = None,
        class_names: ClassNames = None,
        cache_dir: CacheDir = None,
        batch_size: BatchSize = 64,
        workers: Workers = 2,
        device: Device = None,
        no_plots: NoPlots = False,
    ) -> None:
        from polyclip.eval import ProbeConfig, load_labeled, run_linear_probe

        train_set, test_set = load_labeled(train, None, class_names), load_labeled(test, None, class_names)
        val_set = load_labeled(val, None, class_names) if val is not None else None
        run = _run_config(cache_dir, batch_size, workers, device)
        config = ProbeConfig(protocol=protocol, seed=seed)
        _finish(run_linear_probe(models, train_set, test_set, config, run, val_set), out, no_plots)

    @command("fewshot", cls=_ModelsCommand, help="k-shot nearest centroid (BioCLIP) or cache adapter.")
    @_user_errors
    def fewshot_command(
        models: Models,
        train: Annotated[Path, typer.Option("--train", help="Images the supports are drawn from.")],
        out: Out,
        test: Annotated[
            Path | None, typer.Option("--test", help="Query images (default: the rest of train).")
        ] = None,
        val: Annotated[
            Path | None,
            typer.Option("--val", help="Images to search the cache adapter's alpha and beta on."),
        ] = None,
        method: Annotated[str, typer.Option("--method", help="centroid or tip_adapter.")] = "centroid",
        alpha: Annotated[
            float, typer.Option("--alpha", help="tip_adapter: weight of the cache logits (without --val).")
        ] = 1.0,
        beta: Annotated[
            float, typer.Option("--beta", help="tip_adapter: sharpness of the cache (without --val).")
        ] = 1.0,
        scale: Annotated[
            float | None,
            typer.Option("--scale", help="tip_adapter: zero-shot logit scale (default: the model's own)."),
        ] = None,
        shots: Annotated[str, typer.Option("--shots", help="Comma-separated k.")] = "1,5",
        folds: Annotated[int, typer.Option("--folds", help="Support draws per k.")] = 5,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        templates: Templates = None,
        class_names: ClassNames = None,
        cache_dir: CacheDir = None,
        batch_size: BatchSize = 64,
        workers: Workers = 2,
        device: Device = None,
        no_plots: NoPlots = False,
    ) -> None:
        from polyclip.eval import FewShotConfig, TipAdapterConfig, load_labeled, run_few_shot

        train_set = load_labeled(train, None, class_names)
        test_set = load_labeled(test, None, class_names) if test is not None else None
        val_set = load_labeled(val, None, class_names) if val is not None else None
        tip = TipAdapterConfig(alpha=alpha, beta=beta, zero_shot_scale=scale)
        config = FewShotConfig(
            method=method, shots=_ints(shots, "--shots"), folds=folds, seed=seed,
            templates=resolve_templates_option(templates, "openai_imagenet"), tip=tip,
        )  # fmt: skip
        run = _run_config(cache_dir, batch_size, workers, device)
        _finish(run_few_shot(models, train_set, test_set, config, run, val_set), out, no_plots)

    @command("hierarchy", cls=_ModelsCommand, help="Zero-shot over leaves, accuracy per rank.")
    @_user_errors
    def hierarchy_command(
        models: Models,
        data: Annotated[Path, typer.Option("--data", help="Images labelled with leaf classes.")],
        hierarchy: Annotated[
            Path, typer.Option("--hierarchy", help="CSV: header = ranks, one row per leaf.")
        ],
        out: Out,
        templates: Templates = None,
        prompt_from: Annotated[str, typer.Option("--prompt-from", help="leaf or path (all ranks).")] = "leaf",
        cache_dir: CacheDir = None,
        batch_size: BatchSize = 64,
        workers: Workers = 2,
        device: Device = None,
        no_plots: NoPlots = False,
    ) -> None:
        from polyclip.eval import Hierarchy, HierarchyConfig, load_labeled, run_hierarchical

        dataset = load_labeled(data)
        config = HierarchyConfig(
            templates=resolve_templates_option(templates, "bioclip"), prompt_from=prompt_from
        )
        run = _run_config(cache_dir, batch_size, workers, device)
        _finish(run_hierarchical(models, dataset, Hierarchy.from_csv(hierarchy), config, run), out, no_plots)

    @command(
        "bias", cls=_ModelsCommand, help="WEAT-style association effect sizes with permutation p-values."
    )
    @_user_errors
    def bias_command(
        models: Models,
        tests: Annotated[Path, typer.Option("--tests", help="JSON/TOML file of tests (x, y, a, b).")],
        out: Out,
        permutations: Annotated[int, typer.Option("--permutations", help="Sampled partitions.")] = 10000,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        cache_dir: CacheDir = None,
        batch_size: BatchSize = 64,
        workers: Workers = 2,
        device: Device = None,
        no_plots: NoPlots = False,
    ) -> None:
        from polyclip.eval import BiasConfig, load_bias_tests, run_bias

        config = BiasConfig(num_permutations=permutations, seed=seed)
        run = _run_config(cache_dir, batch_size, workers, device)
        _finish(run_bias(models, load_bias_tests(tests), config, run), out, no_plots)

    app.add_typer(eval_app, name="eval")
