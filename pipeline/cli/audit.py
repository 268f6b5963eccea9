"""`legonet audit ...`: verify the log, show or report records, check an ID, checkpoints and receipts
(pipeline.audit.review does the work), and the operator's key work (pipeline.audit.keyops)."""

from __future__ import annotations

import argparse
import json
import sys
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
    a.add_argument("--trusted-key", required=True, action="append", metavar="KEY",
                   help="the project's published PEM public key file (audit/signing-key.pub: every key in it) or a "
                        "fingerprint; repeatable (a receipt made after a key rotation may need the old and new key)")
    a = actions.add_parser("rotate-key", help="rotate the signing key and/or the audit (HMAC) key; a signed record")
    a.add_argument("--signing", action="store_true", help="a new Ed25519 signing key (the old one signs the switch)")
    a.add_argument("--hmac", action="store_true", help="a new audit key for the next records (old ones are kept)")
    a = actions.add_parser("backup-keys", help="write every file of the key dir to DEST (mode 0600, never replaced)")
    a.add_argument("dest", type=Path)
    a = actions.add_parser("restore-keys", help="put a backup's files back into the key dir (never over others)")
    a.add_argument("src", type=Path)
    actions.add_parser("move-keys", help="move keys kept inside the project (.legonet/keys) to the per-user key dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the log's cryptography, DVC and MLflow load only for `audit`
    from pipeline.audit import review
    from pipeline.audit.keyring import in_project_note
    from pipeline.audit.receipt import receipt_json
    from pipeline.project.params import load_params

    if args.action == "verify-receipt":  # needs no project: a data subject or a regulator runs it anywhere
        for line in review.check_receipt(args.file, args.trusted_key):
            print(f"ok: {line}")
        return 0
    root, params = Path.cwd(), load_params()
    if args.action in ("rotate-key", "backup-keys", "restore-keys", "move-keys"):
        return _keys(root, params, args)
    reader = (args.trusted_key, args.checkpoint)
    if args.action == "verify":
        for line in review.verify(root, params, args.rebuild, *reader):
            print(f"ok: {line}")
        if note := in_project_note(root, params):
            print(note, file=sys.stderr)
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


def _keys(root: Path, params: dict[str, object], args: argparse.Namespace) -> int:
    """The operator's key work, each under the project lock (a forget must not sign or key in between)."""
    # lazy: as in run()
    from pipeline.audit import keyops
    from pipeline.forget.flow import project_lock

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    with project_lock(root, True, say):
        if args.action == "rotate-key":
            if not (args.signing or args.hmac):
                print("legonet audit rotate-key: give --signing, --hmac or both", file=sys.stderr)
                return 2
            keyops.rotate(root, params, args.signing, args.hmac, say)
        elif args.action == "backup-keys":
            count = keyops.backup(root, params, args.dest)
            print(f"wrote {count} key dir file(s) to {args.dest} (mode 0600)")
            say(keyops.LOSS)
        elif args.action == "restore-keys":
            restored, kept = keyops.restore(root, params, args.src)
            print(f"restored {len(restored)} file(s): {', '.join(restored) or 'none (all were already there)'}")
            if kept:
                print(f"kept the key dir's own {', '.join(kept)} (the backup's are older or another)")
        else:
            print(f"moved the audit keys to {keyops.move(root, params)}")
    return 0
