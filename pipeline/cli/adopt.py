"""`legonet adopt`: give a project made before project IDs its ID and claim its MLflow objects."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.output import console


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adopt", help="give a project made before project IDs its ID and claim its MLflow objects")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: MLflow loads only for the commands that need it
    from pipeline.forget.flow import project_lock
    from pipeline.tracking.identity import adopt

    with project_lock(Path.cwd(), wait=True, notify=lambda m: console.print(m, highlight=False)):
        done = adopt(Path.cwd())
    print(f"project ID {done['project_id']} (params.yaml, committed): claimed the experiment, {done['runs']} run(s), "
          f"the registered model, {done['model_versions']} version(s) and {done['logged_models']} logged model(s)")
    return 0
