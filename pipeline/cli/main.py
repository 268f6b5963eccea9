"""The `legonet` command. Each subcommand maps its errors to one line on stderr and a distinct exit code."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from pipeline.data.dataset import DataError
from pipeline.project.params import ParamsError

console = Console(stderr=True)
EXIT = {"usage": 2, "data": 3, "params": 4, "build": 5, "model": 6, "busy": 7, "exactness": 8, "audit": 9,
        "store": 10}


def _parse_set(values: list[str]) -> dict[str, Any]:
    out = {}
    for item in values:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set adapters.n=16")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.project.init import init_project

    started = time.monotonic()
    features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    summary = init_project(Path(args.project), data=args.data, reference=args.reference, test=args.test,
                           force=args.force, overrides=_parse_set(args.set), features=features)
    for path, rows in summary.counts.items():
        console.print(f"  {path}: {rows} samples")
    for choice in summary.choices:
        console.print(f"  chose {choice}; --set the key to choose yourself", highlight=False)
    console.print(f"initialised {Path(args.project).resolve()} in {time.monotonic() - started:.1f} s; "
                  f"next: cd {args.project} && legonet build")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from pipeline.forget.flow import project_lock
    from pipeline.project.params import commit_project
    from pipeline.runner.build import repro, summary, tag_build

    root = Path.cwd()
    started = time.monotonic()
    with project_lock(root, wait=True, notify=lambda m: console.print(m, highlight=False)):  # not under a forget
        ran = repro(root, force=args.force, console=console)
        registered = tag_build(root) if ran else {}
    metrics = summary(root)
    built = (f": model version {registered['version']} [{registered['aliases']}], test accuracy "
             f"{metrics.get('accuracy', float('nan')):.4f}") if registered else ""
    commit_project(root, f"legonet build{built}")  # dvc.lock, metrics, regenerated params: git status stays clean
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


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.cli.predict import predict_file

    frame = predict_file(Path.cwd(), args.file, args.model)
    if args.output:
        frame.to_csv(args.output, index=False)
        console.print(f"wrote {len(frame)} predictions to {args.output}")
    else:
        frame.to_csv(sys.stdout, index=False)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import subprocess

    return subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=Path.cwd()).returncode


def cmd_forget(args: argparse.Namespace) -> int:
    import json

    from pipeline.forget.steps import forget
    from pipeline.project.params import load_params

    summary = forget(Path.cwd(), args.manifests, load_params(), dry_run=args.dry_run, wait=not args.no_wait,
                     allow_unknown=args.allow_unknown or None,
                     say=lambda m: console.print(m, highlight=False, soft_wrap=True))  # a checkpoint must not wrap
    if args.profile and "timings" in summary:
        for phase, seconds in summary["timings"].items():
            print(f"{phase:>14} {seconds:8.2f} s")
    print(json.dumps({k: v for k, v in summary.items() if k != "timings"}, sort_keys=True))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import json

    from pipeline.cli import audit
    from pipeline.project.params import load_params

    if args.action == "verify-receipt":  # needs no project: a data subject or a regulator runs it anywhere
        for line in audit.check_receipt(args.file, args.trusted_key):
            print(f"ok: {line}")
        return 0
    root, params, reader = Path.cwd(), load_params(), (args.trusted_key, args.checkpoint)
    if args.action == "verify":
        for line in audit.verify(root, params, args.rebuild, *reader):
            print(f"ok: {line}")
    elif args.action == "show":
        print(json.dumps(audit.show(root, params, args.request_id, *reader), indent=1, sort_keys=True))
    elif args.action == "report":
        print(f"wrote {audit.report(root, params, args.output, *reader)}")
    elif args.action == "checkpoint":
        _emit(audit.checkpoint(root, params, *reader), args.output, "checkpoint")
    elif args.action == "receipt":
        from pipeline.audit.receipt import receipt_json

        _emit(receipt_json(audit.receipt(root, params, args.request_id, *reader)), args.output, "receipt")
    else:
        found = audit.check_id(root, params, args.sample_id, *reader)
        if not found:
            print(f"no forget request in this project's audit log covers {args.sample_id!r}")
            return 1
        for item in found:
            print(f"forgotten by request {item['request_id']} (recorded {item['recorded_at']})")
    return 0


def _emit(text: str, output: Path | None, what: str) -> None:
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote the {what} to {output}")


def _errors() -> dict[type[BaseException], str]:
    from pipeline.audit.log import AuditError
    from pipeline.cli.audit import AuditFailed
    from pipeline.cli.predict import ModelError
    from pipeline.forget.flow import ExactnessError, ForgetError, LockBusy
    from pipeline.forget.manifest import ManifestError
    from pipeline.project.init import InitError
    from pipeline.purge.s3 import StoreError
    from pipeline.runner.build import BuildError
    from pipeline.runner.executor import ExecutorError
    from pipeline.runner.worker import WorkerFailed

    return {LockBusy: "busy", DataError: "data", ParamsError: "params", InitError: "usage", BuildError: "build",
            ModelError: "model", ManifestError: "data", ForgetError: "data", ExactnessError: "exactness",
            AuditFailed: "audit", AuditError: "audit", ExecutorError: "params", WorkerFailed: "build",
            StoreError: "store"}


def main(argv: list[str] | None = None) -> int:
    # `dvc init` (in `legonet init`) starts a detached analytics process before the project's config turns
    # analytics off; this covers every `dvc` child of legonet
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    parser = argparse.ArgumentParser(prog="legonet", description=__doc__)
    parser.add_argument("-C", dest="directory", default=".", help="run as if started in this project folder")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a DVC project from the bundled MNIST digits or your own data")
    p.add_argument("project", nargs="?", default=".", help="project folder (created if missing)")
    p.add_argument("--data", type=Path,
                   help="labelled samples (Parquet/CSV: sample_id, label, then image, text or numeric columns)")
    p.add_argument("--features", metavar="A,B,...",
                   help="a table's payload columns (default: every column but sample_id and label)")
    p.add_argument("--reference", type=Path, help="non-deletable reference split (else carved by hash)")
    p.add_argument("--test", type=Path, help="test split (else carved by hash)")
    p.add_argument("--force", action="store_true", help="replace the data of an existing project")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("build", help="dvc repro + registry: build the model")
    p.add_argument("--force", action="store_true", help="rebuild every stage (dvc repro -f)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("predict", help="predict a file of samples with the champion (or latest) model")
    p.add_argument("file", type=Path)
    p.add_argument("--model", help="model URI (default: models:/<registered_model>@champion, else latest)")
    p.add_argument("--output", type=Path, help="CSV to write (default: stdout)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("forget", help="apply deletion manifests: remove, retrain what they touched, purge, audit")
    p.add_argument("manifests", nargs="+", type=Path, help="JSON, YAML or CSV manifest(s); several = one rebuild")
    p.add_argument("--dry-run", action="store_true", help="print what would be retrained and the cost; change nothing")
    p.add_argument("--no-wait", action="store_true", help="fail at once if another forget holds the project lock")
    p.add_argument("--allow-unknown", action="store_true",
                   help="record unknown IDs as 'not present' instead of failing")
    p.add_argument("--profile", action="store_true", help="print the time of each phase")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("audit", help="verify the audit log, show or report records, check an ID, receipts")
    actions = p.add_subparsers(dest="action", required=True)
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trusted-key", action="append", default=[], metavar="KEY",
                       help="trust this signing key (fingerprint or PEM file) instead of LEGONET_TRUSTED_KEYS or "
                            "the key dir's trusted-keys file; repeatable")
    trust.add_argument("--checkpoint", action="append", default=[], type=Path, metavar="FILE",
                       help="a signed checkpoint you kept: refuse a log that does not extend it (repeatable)")
    a = actions.add_parser("verify", parents=[trust],
                           help="signatures, chain, checkpoints, artifacts vs last record, no forgotten ID present")
    a.add_argument("--rebuild", action="store_true", help="also re-derive the affected adapters and compare bits")
    a = actions.add_parser("show", parents=[trust], help="print one request's record")
    a.add_argument("request_id")
    a = actions.add_parser("report", parents=[trust], help="write an HTML report for a compliance officer")
    a.add_argument("--output", type=Path, default=Path("audit-report.html"))
    a = actions.add_parser("check-id", parents=[trust], help="was this sample ID forgotten? (matched by HMAC)")
    a.add_argument("sample_id")
    a = actions.add_parser("checkpoint", parents=[trust], help="print the current signed checkpoint of the log")
    a.add_argument("--output", type=Path, help="write it to this file instead")
    a = actions.add_parser("receipt", parents=[trust],
                           help="a data subject's receipt: record, inclusion proof, checkpoint (JSON)")
    a.add_argument("request_id")
    a.add_argument("--output", type=Path, help="write it to this file instead")
    a = actions.add_parser("verify-receipt", help="check a receipt offline, with no project present")
    a.add_argument("file", type=Path)
    a.add_argument("--trusted-key", required=True, metavar="KEY",
                   help="the project's published PEM public key file (audit/signing-key.pub) or its fingerprint")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("status", help="what `dvc repro` would rerun")
    p.set_defaults(func=cmd_status)

    args = parser.parse_args(argv)
    if args.command != "init":
        os.chdir(args.directory)
    elif args.directory != ".":
        args.project = str(Path(args.directory) / args.project)
    errors = _errors()
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except tuple(errors) as exc:
        kind = next(v for k, v in errors.items() if isinstance(exc, k))
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT[kind]


def run() -> None:
    """The `legonet` console script: ``main``, then an exit that skips the interpreter's teardown.

    Tearing down the modules a forget imports (Great Expectations, MLflow, torch, DVC) took 3-5 s after the
    work was done (measured on the default project), a sixth of a forget. Every exit handler still runs first
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
