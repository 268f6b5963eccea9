"""`legonet requests`: the deferred deletion requests (`legonet forget --defer`) with their deadlines;
`legonet requests run`: forget them all in one rebuild (for cron, a systemd timer or an Airflow task)."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path

from pipeline.cli.output import console


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("requests", help="list the deferred deletion requests; `requests run` forgets them")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    actions = p.add_subparsers(dest="action")
    r = actions.add_parser("run", help="forget every deferred request in one rebuild")
    r.add_argument("--due-within", type=_days, metavar="DAYS",
                   help="run only when a request is due within DAYS (e.g. 2, 0.5); then all of them")
    r.add_argument("--no-wait", action="store_true", help="fail at once if another forget holds the project lock")
    p.set_defaults(func=run)


def _days(text: str) -> timedelta:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of days >= 0")
    return timedelta(days=days)


def run(args: argparse.Namespace) -> int:
    # lazy: DVC, MLflow and the audit log load only for `requests run`
    from pipeline.forget import requests
    from pipeline.project.params import load_params

    root, params = Path.cwd(), load_params()
    requests.sla_days(params)  # a bad setting is reported before anything runs
    if args.action == "run":
        from pipeline.forget.defer import run_pending  # lazy: the forget flow (DVC, MLflow) only to run

        summary = run_pending(root, params, due_within=args.due_within, wait=not args.no_wait,
                              say=lambda m: console.print(m, highlight=False, soft_wrap=True))
        print(json.dumps({k: v for k, v in summary.items() if k != "timings"}, sort_keys=True))
        return 0
    at = requests.now()
    items = requests.pending(root)
    requests.check_deadlines(root, lambda m: console.print(m, highlight=False, soft_wrap=True), at)
    if args.json:
        print(json.dumps([{"request_id": d.request_id, "received_at": d.received_at, "deadline": d.deadline,
                           "state": d.state, "quarantined_at": d.quarantined_at, "overdue": d.due(at)}
                          for d in items], indent=1))
        return 0
    if not items:
        console.print("no deferred request is pending")
        return 0
    print(f"{'request':<32} {'received':<26} {'deadline':<26} {'state':<12} left")
    for d in items:
        left = (requests.received_time(d.deadline) - at).total_seconds() / 86400
        print(f"{d.request_id:<32} {d.received_at:<26} {d.deadline:<26} {d.state:<12} "
              f"{'OVERDUE' if left <= 0 else f'{left:.1f} days'}")
    return 0
