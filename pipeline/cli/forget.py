"""`legonet forget MANIFEST...`: apply deletion requests (pipeline.forget.steps) and print a JSON summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.cli.output import console
from pipeline.errors import ForgetError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forget", help="apply deletion manifests: remove, retrain what they touched, purge, audit")
    p.add_argument("manifests", nargs="+", type=Path, help="JSON, YAML or CSV manifest(s); several = one rebuild")
    p.add_argument("--dry-run", action="store_true", help="print what would be retrained and the cost; change nothing")
    p.add_argument("--no-wait", action="store_true", help="fail at once if another forget holds the project lock")
    p.add_argument("--allow-unknown", action="store_true",
                   help="record unknown IDs as 'not present' instead of failing")
    p.add_argument("--defer", action="store_true",
                   help="validate, keep and quarantine now; retrain later with `legonet requests run` (by the "
                        "deadline, requests.sla_days after received_at)")
    p.add_argument("--profile", action="store_true", help="print the time of each phase")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: DVC, torch and the audit log load only for the commands that need them
    from pipeline.audit.record import keys_note
    from pipeline.forget.defer import defer
    from pipeline.forget.steps import forget
    from pipeline.project.params import load_params

    def say(message: str) -> None:
        console.print(message, highlight=False, soft_wrap=True)  # a checkpoint must not wrap

    if args.defer and args.dry_run:
        raise ForgetError("--defer and --dry-run together: --dry-run alone shows what the request would retrain")
    if args.defer:
        summary = defer(Path.cwd(), args.manifests, load_params(), wait=not args.no_wait,
                        allow_unknown=args.allow_unknown or None, say=say)
    else:
        summary = forget(Path.cwd(), args.manifests, load_params(), dry_run=args.dry_run, wait=not args.no_wait,
                         allow_unknown=args.allow_unknown or None, say=say)
    if args.profile and "timings" in summary:
        for phase, seconds in summary["timings"].items():
            print(f"{phase:>14} {seconds:8.2f} s")
    print(json.dumps({k: v for k, v in summary.items() if k != "timings"}, sort_keys=True))
    if note := keys_note(Path.cwd(), load_params()):
        print(note, file=sys.stderr)
    return 0
