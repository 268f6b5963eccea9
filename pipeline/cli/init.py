"""`legonet init`: create a DVC project from the bundled MNIST digits or the user's own samples."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli.output import console
from pipeline.errors import ParamsError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a DVC project from the bundled MNIST digits or your own data")
    p.add_argument("project", nargs="?", default=".", help="project folder (created if missing)")
    p.add_argument("--data", type=Path,
                   help="labelled samples (Parquet/CSV: sample_id, label, then image, text or numeric columns)")
    p.add_argument("--features", metavar="A,B,...",
                   help="a table's payload columns (default: every column but sample_id and label)")
    p.add_argument("--reference", type=Path, help="non-deletable reference split (else carved by hash)")
    p.add_argument("--test", type=Path, help="test split (else carved by hash)")
    p.add_argument("--force", action="store_true", help="replace the data of an existing project")
    p.add_argument("--data-secret", type=Path, metavar="FILE",
                   help="build with another project's data secret (its key dir's data.secret), e.g. a from-scratch "
                        "rebuild that must equal it bit for bit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.project.init import init_project  # lazy: pandas, DVC and the encoders load only for `init`

    started = time.monotonic()
    features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    summary = init_project(Path(args.project), data=args.data, reference=args.reference, test=args.test,
                           force=args.force, overrides=parse_set(args.set), features=features,
                           data_secret=args.data_secret)
    for path, rows in summary.counts.items():
        console.print(f"  {path}: {rows} samples")
    for choice in summary.choices:
        console.print(f"  chose {choice}; --set the key to choose yourself", highlight=False)
    console.print(f"initialised {Path(args.project).resolve()} in {time.monotonic() - started:.1f} s; "
                  f"next: cd {args.project} && legonet build")
    return 0


def parse_set(values: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs, each value read as YAML (``adapters.n=16`` is the number 16)."""
    out = {}
    for item in values:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set adapters.n=16")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out
