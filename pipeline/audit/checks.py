"""The rules one audit record must pass, each returning what failed (docs/design.md section 9).

Signatures by trusted keys only, key rotations signed by the key they replace, sequence numbers and the
hash chain, and a checkpoint that the log extends. ``AuditLog`` applies them in order to every record it
has not verified before, and refuses the log if any returns a problem.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pipeline.audit.envelope import (
    PAYLOAD_TYPE,
    dsse_b64decode,
    key_id,
    pae,
)
from pipeline.audit.secrets import load_public_key
from pipeline.audit.transparency import Checkpoint, consistency_proof, root_hash, verify_consistency
from pipeline.errors import AuditError, TransparencyError


@dataclass(frozen=True)
class Entry:
    """A record file, as its name describes it (which ``verify`` checks against its content)."""

    sequence: int
    request_id: str
    path: Path



def open_checkpoint(note: str, keys: dict[str, Ed25519PublicKey], trusted: Collection[str]) -> Checkpoint:
    """The checkpoint in ``note`` if one of the trusted keys signed it."""
    for fingerprint in sorted(trusted):
        if fingerprint in keys:
            try:
                return Checkpoint.open(note, keys[fingerprint])
            except TransparencyError as exc:
                if "no signature by" not in str(exc):
                    raise
    raise AuditError(f"not signed by a trusted key ({short_fingerprints(trusted)})")


def extension_problems(note: str, keys: dict[str, Ed25519PublicKey], trusted: Collection[str],
                        leaves: list[bytes]) -> list[str]:
    """Why the log (its ``leaves`` hashes) does not extend the signed checkpoint ``note``; a consistency proof
    decides."""
    try:
        old = open_checkpoint(note, keys, trusted)
    except (AuditError, TransparencyError) as exc:
        return [f"checkpoint: {exc}"]
    if old.size > len(leaves):
        return [f"checkpoint: the log has {len(leaves)} record(s), but a checkpoint signed for it has "
                f"{old.size}: records were deleted (truncated or rolled back)"]
    if old.size and not verify_consistency(old.size, len(leaves), old.root, root_hash(leaves),
                                           consistency_proof(leaves, old.size)):
        return [f"checkpoint: the first {old.size} record(s) are not those the checkpoint signed: the log was "
                "rewritten (records changed, removed or reordered)"]
    return []


def signature_problems(envelope: dict[str, Any], payload: bytes, keys: dict[str, Ed25519PublicKey],
                        active: set[str]) -> list[str]:
    problems = []
    message = pae(PAYLOAD_TYPE, payload)
    for signature in envelope["signatures"]:
        keyid = signature.get("keyid", "")
        if not keyid:  # DSSE allows it; this log's records name their key, so a reader knows which one to trust
            problems.append("a signature without a keyid: every record names the key that signed it")
            continue
        if keyid not in active:
            problems.append(f"signed by key {keyid[:16]}, which is not trusted to sign here (trusted: "
                            f"{short_fingerprints(active)}): a substituted or unpinned key")
            continue
        public_key = keys.get(keyid)
        if public_key is None:
            problems.append(f"signed by trusted key {keyid[:16]}, whose public key is missing from "
                            "audit/signing-key.pub; restore it from git")
            continue
        try:
            public_key.verify(dsse_b64decode(signature["sig"]), message)
        except (InvalidSignature, ValueError):
            problems.append(f"bad signature by key {keyid[:16]}: modified after signing")
    return problems


def rotate(predicate: dict[str, Any], keys: dict[str, Ed25519PublicKey], active: set[str],
            signers: list[str]) -> list[str]:
    """Apply a verified key-rotation record: its new key replaces the key that signed it."""
    new_id, pem = predicate.get("new_key_id"), predicate.get("new_public_key")
    try:
        new_key = load_public_key("key-rotation record", str(pem).encode("ascii"))
    except (AuditError, UnicodeEncodeError) as exc:
        return [f"key rotation names no usable public key ({exc})"]
    if key_id(new_key) != new_id:
        return [f"key rotation: new_key_id {str(new_id)[:16]} is not the fingerprint of its public key"]
    keys[str(new_id)] = new_key
    active.difference_update(signers)
    active.add(str(new_id))
    return []


def short_fingerprints(fingerprints: Collection[str]) -> str:
    return ", ".join(sorted(f[:16] for f in fingerprints)) or "none"


def order_problems(entry: Entry, before: Entry | None, first_for_request: Entry) -> list[str]:
    """Where a record's file name breaks the sequence 1, 2, ... or repeats a request."""
    problems = []
    if first_for_request is not entry:
        problems.append(f"request {entry.request_id!r} already recorded in {first_for_request.path.name}")
    if before and entry.sequence == before.sequence:
        problems.append(f"sequence number {entry.sequence} is also used by {before.path.name}")
    elif entry.sequence != (before.sequence + 1 if before else 1):
        after = before.path.name if before else "the start"
        problems.append(f"sequence jumps to {entry.sequence} after {after}; record(s) missing or renamed")
    return problems


def chain_problems(entry: Entry, predicate: dict[str, Any], before: Entry | None,
                    before_digest: str | None) -> list[str]:
    """Where a record's content disagrees with its file name or does not link to the record before it."""
    problems = []
    request_id, sequence, previous = (predicate.get(key) for key in ("request_id", "sequence", "previous"))
    if request_id != entry.request_id:
        problems.append(f"file name says request {entry.request_id!r}, the record {request_id!r}")
    if sequence != entry.sequence:
        problems.append(f"file name says sequence {entry.sequence}, the record {sequence!r}")
    if previous != before_digest:
        expected = f"the digest of {before.path.name}, {before_digest}" if before else "null (first record)"
        problems.append(f"chain broken: previous is {previous!r}, expected {expected}")
    return problems


def as_list(value: object) -> list[Any]:
    """A list field of an unverified record, else empty (``in`` on a string would match substrings)."""
    return value if isinstance(value, list) else []
