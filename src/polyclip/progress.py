"""Progress bars: one helper for every long loop of the library and the command line.

``progress_bar`` is tqdm on stderr, shown only where someone watches it: when ``enabled`` and stderr
is a terminal. Otherwise it is a silent stand-in with the same interface (tqdm with ``disable=True``),
so a loop is written once:

    for batch in progress_bar(batches, total=n, desc="encoding", enabled=show):
        ...
    with progress_bar(total=n, unit="img", enabled=show) as bar:
        bar.update(len(batch))

Library functions take ``progress: bool`` and pass it as ``enabled``; the CLI passes ``False`` for
``--json`` (a machine reads the output), and a pipe or a log file never gets bars.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
) -> Any:
    """A tqdm bar over ``iterable`` (or updated by hand), on stderr when it is a terminal and ``enabled``."""
    from tqdm.auto import tqdm

    shown = enabled and sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not shown,
        file=sys.stderr,
        dynamic_ncols=True,
    )
