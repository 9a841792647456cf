"""The ``polyclip`` command: thin commands over the Python API, one module per command group.

Nothing here or in the command modules imports torch (or any polyclip module that does) at import
time: ``polyclip --help``, every subcommand's ``--help`` and argument errors stay as fast as typer
itself. Each command imports what it runs inside its function.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import typer

from polyclip.files import DiskFullError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="polyclip: load, run, train, evaluate and serve CLIP-family models.",
)

# Each module defines register(app). Groups whose module is absent are simply not offered.
COMMAND_MODULES = ("core", "train", "eval", "index", "domains", "medvqa", "video", "onnx", "choose")
for _name in COMMAND_MODULES:
    if importlib.util.find_spec(f"polyclip.cli.{_name}") is not None:
        importlib.import_module(f"polyclip.cli.{_name}").register(app)

# A user's mistake (a bad path, a wrong checkpoint, an unreadable image) is reported in one line.
USER_ERRORS = (
    ValueError,
    LookupError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    NotImplementedError,
    DiskFullError,  # "no space left on device while writing X; free space and rerun to resume"
)


def command_paths() -> list[list[str]]:
    """Every command and command group, as the words a user types: ``[[], ["models"], ["eval"], ...]``."""
    import typer.main

    paths: list[list[str]] = []

    def walk(command, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def print_help_without_parsing(args: list[str]) -> bool:
    """``polyclip [GROUP] [COMMAND] --help``: print that command's help and return True, else False.

    Typer parses every option value through pydantic type adapters before an eager ``--help`` acts,
    and importing pydantic alone costs as much as importing typer and rich. Help needs no parsed
    values, so a bare ``... --help`` renders the same help from the command tree directly; anything
    else (``--help`` among other options, unknown words) goes through typer as usual.
    """
    if not args or args[-1] != "--help":
        return False
    import typer.main

    command = typer.main.get_command(app)
    context = command.context_class(command, info_name="polyclip", **command.context_settings)
    for word in args[:-1]:
        sub = command.get_command(context, word) if hasattr(command, "get_command") else None
        if sub is None:
            return False
        command = sub
        context = command.context_class(command, info_name=word, parent=context, **command.context_settings)
    typer.echo(context.get_help(), color=context.color)
    return True


def main() -> None:
    try:
        if print_help_without_parsing(sys.argv[1:]):
            return
        app()
    except USER_ERRORS as error:
        if os.environ.get("POLYCLIP_DEBUG"):
            raise
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
