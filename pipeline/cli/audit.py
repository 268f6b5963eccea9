"""`legonet audit ...`: verify the log, show or report records, check an ID, checkpoints and receipts
(pipeline.audit.review does the work)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cli.output import emit


def add(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the log's cryptography, DVC and MLflow load only for `audit`
    from pipeline.audit import review
    from pipeline.audit.receipt import receipt_json
    from pipeline.project.params import load_params

    if args.action == "verify-receipt":  # needs no project: a data subject or a regulator runs it anywhere
        for line in review.check_receipt(args.file, args.trusted_key):
            print(f"ok: {line}")
        return 0
    root, params, reader = Path.cwd(), load_params(), (args.trusted_key, args.checkpoint)
    if args.action == "verify":
        for line in review.verify(root, params, args.rebuild, *reader):
            print(f"ok: {line}")
    elif args.action == "show":
        print(json.dumps(review.show(root, params, args.request_id, *reader), indent=1, sort_keys=True))
    elif args.action == "report":
        print(f"wrote {review.report(root, params, args.output, *reader)}")
    elif args.action == "checkpoint":
        emit(review.checkpoint(root, params, *reader), args.output, "checkpoint")
    elif args.action == "receipt":
        emit(receipt_json(review.receipt(root, params, args.request_id, *reader)), args.output, "receipt")
    else:
        found = review.check_id(root, params, args.sample_id, *reader)
        if not found:
            print(f"no forget request in this project's audit log covers {args.sample_id!r}")
            return 1
        for item in found:
            print(f"forgotten by request {item['request_id']} (recorded {item['recorded_at']})")
    return 0
