"""Signed statements: in-toto Statement v1 in a DSSE envelope, Ed25519, over canonical JSON.

Every audit record is one such envelope (docs/design.md section 6). What is signed and hashed is canonical JSON
(sorted keys, no spaces, UTF-8), so a record's bytes, its SHA-256 and its Merkle leaf are each one value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.errors import AuditError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://legonet.dev/forget/v2"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def canonical_json(value: object) -> bytes:
    """The one byte encoding of a JSON value that is signed and hashed: sorted keys, no spaces, UTF-8."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit record is not plain JSON data: {exc}") from exc
    return text.encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 hex of the raw 32-byte public key: the key's fingerprint, in DSSE signatures and trust lists."""
    return sha256_hex(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))



def statement(subjects: dict[str, str], predicate: dict[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 about ``subjects`` (artifact path -> SHA-256 hex), subjects sorted by name."""
    for name, digest in subjects.items():
        if not SHA256_HEX.fullmatch(digest):
            raise AuditError(f"subject {name!r}: digest {digest!r} is not a lowercase SHA-256 hex string")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": subjects[name]}} for name in sorted(subjects)],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def sign_envelope(stmt: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A DSSE envelope of the statement's canonical JSON, signed over the DSSE pre-authentication encoding."""
    payload = canonical_json(stmt)
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{
            "keyid": key_id(key.public_key()),
            "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode("ascii"),
        }],
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 PAE: binds payload type and payload, so a signature cannot be replayed for another type."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


_DECODE_ERRORS = (ValueError, TypeError, binascii.Error, RecursionError)  # ValueError: JSON and UTF-8 errors


def parse_envelope(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A record file's DSSE envelope and its payload bytes, parsed without trusting them."""
    try:
        envelope = json.loads(data)
        if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
            raise ValueError(f"not a DSSE envelope with payloadType {PAYLOAD_TYPE}")
        signatures = envelope.get("signatures")
        if not isinstance(signatures, list) or not signatures or not all(
                isinstance(s, dict) and isinstance(s.get("keyid", ""), str) and isinstance(s.get("sig"), str)
                for s in signatures):
            raise ValueError("signatures must be a non-empty list of {sig, optional keyid}")
        return envelope, dsse_b64decode(envelope.get("payload", ""))
    except _DECODE_ERRORS as exc:
        raise AuditError(f"bad envelope: {exc}") from exc


def dsse_b64decode(text: object) -> bytes:
    """Base64 as DSSE allows it: the standard or the URL-safe alphabet (not both), with or without padding."""
    if not isinstance(text, str):
        raise ValueError("base64 fields must be strings")
    url_safe = any(c in text for c in "-_")
    if url_safe and any(c in text for c in "+/"):
        raise ValueError("base64 mixes the standard and the URL-safe alphabet")
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded, altchars=b"-_" if url_safe else None, validate=True)


def parse_statement(payload: bytes) -> dict[str, Any]:
    """The statement in a payload. Parsed only after the signature check, so edits show as bad signatures."""
    try:
        stmt = json.loads(payload)
        if not isinstance(stmt, dict) or stmt.get("_type") != STATEMENT_TYPE:
            raise ValueError(f"payload is not an in-toto statement ({STATEMENT_TYPE})")
        if stmt.get("predicateType") != PREDICATE_TYPE or not isinstance(stmt.get("predicate"), dict):
            raise ValueError(f"predicate is not a {PREDICATE_TYPE} object")
    except _DECODE_ERRORS as exc:
        raise AuditError(f"bad statement: {exc}") from exc
    return stmt


