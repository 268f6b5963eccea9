"""`legonet promote VERSION|EXPERIMENT`: make a registered version champion, a deliberate act (a DVC experiment's
version is only ever a candidate)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="make a registered version champion, e.g. a DVC experiment's candidate")
    p.add_argument("version", help="a model version number, or the name of the DVC experiment that built it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: MLflow loads only for the commands that need it
    from pipeline.project.params import load_params
    from pipeline.tracking.identity import project_id
    from pipeline.tracking.lineage import configure
    from pipeline.tracking.registry import make_champion, project_store

    params = load_params()
    settings = project_store(params["mlflow"])
    configure(settings["tracking_uri"], settings["experiment"], Path.cwd())
    version, previous = make_champion(settings["registered_model"], args.version, project_id(params))
    print(f"{settings['registered_model']} version {version} is now @champion"
          + (f" (was version {previous})" if previous else ""))
    return 0
