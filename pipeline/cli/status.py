"""`legonet status`: what `dvc repro` would rerun, and which outputs of the checked-out commit were purged by a
forget (so `dvc checkout` cannot restore them, by design)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from pipeline.cli.output import console


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="what `dvc repro` would rerun")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.purge.history import purged_outputs  # lazy: DVC loads only for the commands that need it

    for line in purged_outputs(Path.cwd()):  # an old commit: why `dvc checkout` cannot restore these
        console.print(line, highlight=False, soft_wrap=True)
    return subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=Path.cwd()).returncode
