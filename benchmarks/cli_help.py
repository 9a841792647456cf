"""Time of ``polyclip --help`` and every subcommand's ``--help`` against ``python -c "import typer, rich"``.

Target: each help within 4x the bare typer + rich import (a typer app with fifty commands prints its
help in about 2.5x of that). Each side runs as a fresh process, alternately, ``--runs`` times; the
medians are compared, so a noisy machine shifts both sides alike.

    python benchmarks/cli_help.py [--runs 7] [--target 4]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from polyclip.cli import command_paths


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each side per command")
    parser.add_argument("--target", type=float, default=4.0, help="largest allowed ratio")
    args = parser.parse_args()

    baseline_argv = [sys.executable, "-c", "import typer, rich"]
    _seconds(baseline_argv)  # warm the file cache for both sides
    _seconds([sys.executable, "-m", "polyclip", "--help"])
    print(f"{'command':<34} {'help (ms)':>10} {'typer+rich (ms)':>16} {'ratio':>6}")
    worst = 0.0
    for path in command_paths():
        help_argv = [sys.executable, "-m", "polyclip", *path, "--help"]
        helps, baselines = [], []
        for _ in range(args.runs):
            baselines.append(_seconds(baseline_argv))
            helps.append(_seconds(help_argv))
        ours, theirs = statistics.median(helps), statistics.median(baselines)
        ratio = ours / theirs
        worst = max(worst, ratio)
        name = " ".join(["polyclip", *path, "--help"])
        print(f"{name:<34} {1000 * ours:10.1f} {1000 * theirs:16.1f} {ratio:6.2f}")
    verdict = "within" if worst <= args.target else "OVER"
    print(f"worst ratio {worst:.2f}: {verdict} the {args.target:g}x target")
    return 0 if worst <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
