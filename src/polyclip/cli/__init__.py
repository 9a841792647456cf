"""The ``polyclip`` command: thin commands over the Python API, one module per command group."""

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


def main() -> None:
    try:
        app()
    except USER_ERRORS as error:
        if os.environ.get("POLYCLIP_DEBUG"):
            raise
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
