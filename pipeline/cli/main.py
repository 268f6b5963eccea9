"""The `legonet` command: one module a command (``pipeline/cli/<command>.py``, each with ``add`` and ``run``).
Every error legonet raises on purpose is one line on stderr and its type's exit code (pipeline/errors.py)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from rich.markup import escape

from pipeline.cli import adopt, audit, build, forget, init, predict, promote, requests, serve, status
from pipeline.cli.output import console
from pipeline.errors import LegonetError

COMMANDS = (init, build, promote, adopt, predict, serve, forget, requests, audit, status)


def main(argv: list[str] | None = None) -> int:
    # `dvc init` (in `legonet init`) starts a detached analytics process before the project's config turns
    # analytics off; this covers every `dvc` child of legonet
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    parser = argparse.ArgumentParser(prog="legonet", description=__doc__)
    parser.add_argument("--version", action="version", version=f"legonet {metadata.version('legonet')}")
    parser.add_argument("-C", dest="directory", default=".", help="run as if started in this project folder")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    args = parser.parse_args(argv)
    if args.command != "init":
        os.chdir(args.directory)
    elif args.directory != ".":
        args.project = str(Path(args.directory) / args.project)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except LegonetError as exc:  # one line and the type's exit code (pipeline/errors.py)
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code


def run() -> None:
    """The `legonet` console script: ``main``, then an exit that skips the interpreter's teardown.

    Tearing down the modules a forget imports (Great Expectations, MLflow, torch, DVC) takes seconds after the
    work is done, a large share of a small forget. Every exit handler still runs first
    (logging, MLflow, temporary files): the fast exit is registered before any of them, so it runs last.
    """
    outcome = {"code": 1}  # an uncaught exception: its traceback is printed, then this code
    atexit.register(_fast_exit, outcome)
    try:
        outcome["code"] = main()
    except SystemExit as exc:  # argparse: --help exits 0, a usage error 2; a message (str) exits 1
        outcome["code"] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    sys.exit(outcome["code"])


def _fast_exit(outcome: dict[str, int]) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(outcome["code"])


if __name__ == "__main__":
    run()
