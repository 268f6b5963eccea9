"""`legonet predict FILE`: score a file of samples with the registered champion (or the newest version)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli.output import console


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict a file of samples with the champion (or latest) model")
    p.add_argument("file", type=Path)
    p.add_argument("--model", help="model URI (default: models:/<registered_model>@champion, else latest)")
    p.add_argument("--output", type=Path, help="CSV to write (default: stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.tracking.predict import predict_file  # lazy: MLflow and the model load only for `predict`

    frame = predict_file(Path.cwd(), args.file, args.model)
    if args.output:
        frame.to_csv(args.output, index=False)
        console.print(f"wrote {len(frame)} predictions to {args.output}")
    else:
        frame.to_csv(sys.stdout, index=False)
    return 0
