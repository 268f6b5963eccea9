"""`legonet build`: `dvc repro` with a progress bar, then the registry tags and a git commit, under the lock."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.cli.output import console
from pipeline.project.layout import METRICS


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="dvc repro + registry: build the model")
    p.add_argument("--force", action="store_true", help="rebuild every stage (dvc repro -f)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: DVC and MLflow load only for the commands that need them (`legonet --help` stays instant)
    from pipeline.forget.flow import Writer, index_tables, project_lock
    from pipeline.forget.requests import check_deadlines
    from pipeline.project.code import sync_code
    from pipeline.project.params import load_params, sync_generated
    from pipeline.runner.build import commit_project, dvc_status, ignore_outputs, repro, tag_build
    from pipeline.tracking.head import check_head, check_lease
    from pipeline.tracking.registry import project_store

    root = Path.cwd()
    started = time.monotonic()
    with project_lock(root, wait=True, notify=lambda m: console.print(m, highlight=False)):  # not under a forget
        params = load_params(root)
        store = project_store(params["mlflow"])
        check_head(root, params, store)  # never build on data another clone forgot
        check_lease(root, store)  # nor while another clone forgets or builds (the lease is taken below, if needed)
        check_deadlines(root, lambda m: console.print(m, highlight=False, soft_wrap=True))
        with Writer(root, params) as writer:
            # the .gitignore entries a failed `dvc repro` took back (``ignore_outputs``), restored before DVC hashes
            # anything: one inside a folder a stage reads (data/encoded/train) is part of that folder's hash, so
            # restored only at the end it left a stage that ran meanwhile stale and the next forget refused
            if (root / ".git").exists():
                ignore_outputs(root)
            # nor while another clone forgets; an up-to-date build writes nothing, the lease included
            if args.force or sync_generated(root) | sync_code(root) or dvc_status(root):
                writer.hold()
            ran = repro(root, force=args.force, console=console)
            if ran:  # the build pays for reading what it wrote, not the first forget after it
                console.print(f"indexed the IDs of {index_tables(root)} new sample table(s) for the forget's checks",
                              highlight=False)
                dvc_status(root, stamp=True)  # and for the `dvc status` that forget would start with
            registered = tag_build(root) if ran else {}
            metrics = summary(root)
            built = (f": model version {registered['version']} [{registered['aliases']}], test accuracy "
                     f"{metrics.get('accuracy', float('nan')):.4f}") if registered else ""
            # dvc.lock, metrics, regenerated params: git status stays clean; under the lock, so a forget that
            # starts now sees the build committed, not a work tree between two states
            commit_project(root, f"legonet build{built}")
    elapsed = time.monotonic() - started
    print(f"stages run: {len(ran)} ({elapsed:.1f} s)" if ran else "Data and pipelines are up to date.")
    if "accuracy" in metrics:
        print(f"test accuracy (LegoNet ensemble): {metrics['accuracy']:.4f}")
    if "probe_accuracy" in metrics:
        print(f"test accuracy (single linear probe, same features): {metrics['probe_accuracy']:.4f}")
    if registered:
        print(f"registered model version {registered['version']} aliases [{registered['aliases']}]: "
              f"{registered['gate_reason']}")
    print("look: `dvc metrics show`, `dvc plots show`, `mlflow ui --backend-store-uri sqlite:///mlflow.db`")
    return 0


def summary(root: Path) -> dict[str, float]:
    """Metrics of the last build, as `dvc metrics show` reads them."""
    out: dict[str, float] = {}
    for name in ("evaluate.json", "baseline.json"):
        path = root / METRICS / name
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out
