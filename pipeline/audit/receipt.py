"""A data subject's receipt: one signed audit record, its inclusion proof and the checkpoint it is included in.

The receipt is self-contained JSON: with only the project's published public key (or its fingerprint) anyone
can check, offline and without legonet, that (1) the checkpoint is signed by that key, (2) the record is a leaf
of the checkpointed Merkle tree, and (3) the record's DSSE signature is by that key. It never holds a raw
sample ID (records do not); the request id names it. docs/audit.md holds an independent verifier of a few
dozen lines that needs only ``cryptography``.

After a signing-key rotation, the receipt of a record the old key signed is checked against a checkpoint the
new key signed: it then carries the checkpoint's key too (``checkpoint_public_key``), and both must be trusted.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pipeline.audit.envelope import PAYLOAD_TYPE, dsse_b64decode, key_id, pae, parse_envelope, parse_statement
from pipeline.audit.log import AuditLog
from pipeline.audit.secrets import load_public_key, public_key_pem
from pipeline.audit.transparency import Checkpoint, inclusion_proof, leaf_hash, verify_inclusion
from pipeline.errors import AuditError, TransparencyError

RECEIPT_FORMAT = "https://legonet.dev/receipt/v1"


def make_receipt(log: AuditLog, request_id: str, note: str) -> dict[str, Any]:
    """The receipt of ``request_id`` against the checkpoint ``note`` (which must cover the whole log)."""
    records = log.records()  # verified first
    leaves = log.leaf_data()
    index = next((i for i, data in enumerate(leaves)
                  if parse_statement(parse_envelope(data)[1])["predicate"].get("request_id") == request_id), None)
    if index is None or not any(r["predicate"]["request_id"] == request_id for r in records):
        raise AuditError(f"no audit record for request {request_id!r}; `legonet audit report` lists them")
    signer = parse_statement(parse_envelope(leaves[index])[1])["predicate"]["signing_key_id"]
    notary = next((fp for fp in [signer, *sorted(log.active_keys())] if _opens(note, log.public_key(fp))), None)
    if notary is None:
        raise AuditError("the checkpoint is signed by no key of this log")
    hashes = [leaf_hash(data) for data in leaves]
    extra = {} if notary == signer else {"checkpoint_public_key": public_key_pem(log.public_key(notary)).decode()}
    return {**extra,
        "format": RECEIPT_FORMAT,
        "request_id": request_id,
        "record": leaves[index].decode("utf-8"),
        "leaf_index": index,
        "inclusion_proof": [base64.b64encode(h).decode("ascii") for h in inclusion_proof(hashes, index)],
        "checkpoint": note,
        "public_key": public_key_pem(log.public_key(signer)).decode("ascii"),
    }


def _opens(note: str, key: Ed25519PublicKey) -> bool:
    try:
        Checkpoint.open(note, key)
    except TransparencyError:
        return False
    return True


def verify_receipt(receipt: dict[str, Any], trusted: str | Collection[str]) -> dict[str, Any]:
    """Check a receipt against the trusted key fingerprint(s) (several: a log whose key was rotated); return the
    record's statement, or raise AuditError."""
    trusted = {trusted} if isinstance(trusted, str) else set(trusted)
    try:
        if receipt.get("format") != RECEIPT_FORMAT:
            raise ValueError(f"format is {receipt.get('format')!r}, not {RECEIPT_FORMAT}")
        public_key = load_public_key("receipt public_key", str(receipt["public_key"]).encode("ascii"))
        notary = load_public_key("receipt checkpoint_public_key",
                                 str(receipt.get("checkpoint_public_key", receipt["public_key"])).encode("ascii"))
        record = str(receipt["record"]).encode("utf-8")
        proof = [base64.b64decode(p, validate=True) for p in receipt["inclusion_proof"]]
        index = int(receipt["leaf_index"])
        note = str(receipt["checkpoint"])
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise AuditError(f"malformed receipt: {exc}") from exc
    for what, key in (("record", public_key), ("checkpoint", notary)):
        if key_id(key) not in trusted:
            raise AuditError(f"the receipt's {what} is signed by key {key_id(key)[:16]}, not a trusted key "
                             f"({', '.join(sorted(f[:16] for f in trusted))})")
    try:
        checkpoint = Checkpoint.open(note, notary)
    except TransparencyError as exc:
        raise AuditError(f"checkpoint: {exc}") from exc
    if not verify_inclusion(index, checkpoint.size, leaf_hash(record), proof, checkpoint.root):
        raise AuditError(f"the record is not leaf {index} of the checkpointed tree of {checkpoint.size} records")
    envelope, payload = parse_envelope(record)
    if not _signed_by(envelope, payload, public_key, key_id(public_key)):
        raise AuditError("the record's signature does not verify with the trusted key")
    stmt = parse_statement(payload)
    if stmt["predicate"].get("request_id") != receipt.get("request_id"):
        raise AuditError("the receipt's request_id is not the record's")
    return stmt


def _signed_by(envelope: dict[str, Any], payload: bytes, public_key: Ed25519PublicKey, trusted: str) -> bool:
    """Whether a signature by ``public_key`` verifies, and none that names it fails (DSSE: the keyid is an
    optional hint, so a signature without one is tried with the trusted key; one with another keyid is not its)."""
    verified = False
    for signature in envelope["signatures"]:
        named = signature.get("keyid", "")
        if named not in ("", trusted):
            continue
        try:
            public_key.verify(dsse_b64decode(signature["sig"]), pae(PAYLOAD_TYPE, payload))
        except (InvalidSignature, ValueError):
            if named:  # a bad signature that claims the trusted key: the record was changed
                return False
            continue
        verified = True
    return verified


def receipt_json(receipt: dict[str, Any]) -> str:
    return json.dumps(receipt, indent=1, sort_keys=True) + "\n"

