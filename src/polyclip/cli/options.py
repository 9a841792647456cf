"""What the commands share: option types that mean one thing everywhere, and fixed-choice options.

Nothing here imports torch: the types are built from plain names, and tests check that the names
match the API's (the dtypes of `polyclip.factory.DTYPES`, the clip aggregations, the export formats).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer


def choices(name: str, values: tuple[str, ...]) -> type[enum.StrEnum]:
    """A typer choice type: ``--help`` lists ``values`` and any other value is an argument error."""
    return enum.StrEnum(name, {value.replace("-", "_"): value for value in values})


# dtype names polyclip.load and the index accept (polyclip.factory.DTYPES; checked by a test)
DtypeChoice = choices("DtypeChoice", ("fp32", "bf16", "fp16"))

JsonOutput = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]
TopK = Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many results to show.")]
Dtype = Annotated[
    DtypeChoice | None, typer.Option("--dtype", help="Weights' dtype (default: fp32).", case_sensitive=False)
]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: the model's).")]
Templates = Annotated[
    list[str] | None,
    typer.Option(
        "--templates",
        "--template",
        help="Prompt templates: a set name (see `polyclip eval templates`), a literal with {} "
        '("a photo of a {}.") or a file; repeat to combine.',
    ),
]


def resolve_templates_option(values: list[str] | None, default: str | None = None) -> list[str] | None:
    """``--templates`` values, each a set name, a literal or a file, combined in order (None: ``default``).

    Through the core's one resolver (`polyclip.zero_shot.resolve_templates`), imported here so that
    `--help` stays light.
    """
    from polyclip.zero_shot import TemplateError, resolve_templates

    if not values:
        return None if default is None else resolve_templates(default)
    resolved: list[str] = []
    for value in values:
        spec = Path(value) if Path(value).is_file() else value
        try:
            resolved += [t for t in resolve_templates(spec) if t not in resolved]
        except TemplateError as error:  # a usage error: exit status 2, the message, no traceback
            raise typer.BadParameter(str(error), param_hint="'--templates'") from None
    return resolved
