"""The rules one audit record must pass, each returning what failed (docs/design.md section 9).

Signatures by trusted keys only, key rotations signed by the key they replace, sequence numbers and the
hash chain, and a checkpoint that the log extends. ``AuditLog`` applies them in order to every record it
has not verified before, and refuses the log if any returns a problem.
"""

from __future__ import annotations

import re
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

FORGET = "forget"
KEY_ROTATION = "key-rotation"  # the signing key: the record names the new public key, signed by the old one
AUDIT_KEY_ROTATION = "audit-key-rotation"  # the HMAC key: later records are keyed with the new one
KINDS = (FORGET, KEY_ROTATION, AUDIT_KEY_ROTATION)
_KEY_ID = re.compile(r"[0-9a-f]{16}")


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


def keying_problems(predicate: dict[str, Any], in_force: str | None) -> list[str]:
    """Where a record breaks the succession of audit (HMAC) keys: a forget is keyed with the key in force (the
    first forget's, or the one the last audit-key rotation introduced); a rotation replaces the key in force."""
    kind = predicate.get("kind")
    if kind not in KINDS:
        return [f"record of unknown kind {str(kind)[:40]!r}: no reader knows what it claims"]
    if kind == FORGET and in_force is not None and predicate.get("audit_key_id") != in_force:
        return [f"keyed with audit key {str(predicate.get('audit_key_id'))[:16]}, but the key in force is "
                f"{in_force} (the first forget's, or the last audit-key rotation's)"]
    if kind != AUDIT_KEY_ROTATION:
        return []
    old, new = predicate.get("old_audit_key_id"), predicate.get("new_audit_key_id")
    if not isinstance(new, str) or not _KEY_ID.fullmatch(new) or new == old:
        return [f"audit-key rotation names no new key id (16 hex digits, not the old one): {str(new)[:40]!r}"]
    if old != in_force:
        return [f"audit-key rotation replaces key {str(old)[:16]}, but the key in force is {in_force}"]
    return []


def in_force(summaries: list[dict[str, Any]]) -> str | None:
    """The audit key id that keys the next record: the last one a forget or an audit-key rotation named."""
    return next((s["audit_key_id"] for s in reversed(summaries)
                 if s.get("kind") in (FORGET, AUDIT_KEY_ROTATION) and s.get("audit_key_id")), None)


ADAPTER_ROOT = "adapter files (Merkle root)"  # how the chain names the adapter files a record publishes as one root


def artifact_chain_problems(predicates: list[dict[str, Any]]) -> list[str]:
    """Where a forget record's ``before`` artifact digests are not what the forgets before it left.

    The records of one batch share their artifacts (one rebuild). Each batch must start from the digests the
    previous one left (its ``after``, and its untouched adapters) for every path both name, unless a build ran
    in between: then the batch's ``dvc_lock.before`` is not the previous ``dvc_lock.after``, the build's changes
    are in git's dvc.lock history, not in the log, and the chain starts again from this batch's state.
    """
    problems: list[str] = []
    state: dict[str, Any] = {}  # path -> digest, as the forgets so far left it (the paths they name)
    last: tuple[Any, ...] | None = None
    left_by = ""
    for predicate in predicates:
        name = str(predicate.get("request_id"))
        lock = predicate.get("dvc_lock") if isinstance(predicate.get("dvc_lock"), dict) else {}
        artifacts = predicate.get("artifacts") if isinstance(predicate.get("artifacts"), dict) else {}
        untouched = predicate.get("untouched_adapters") if isinstance(predicate.get("untouched_adapters"), dict) else {}
        if isinstance(predicate.get("adapter_files"), dict):  # the adapter files, published as one root
            artifacts = {**artifacts, ADAPTER_ROOT: predicate["adapter_files"]}
        batch = (as_list(predicate.get("batch_request_ids")), lock, artifacts, untouched)
        if last is not None and batch[0] == last[0]:
            if batch != last:
                problems.append(f"record of request {name!r}: its batch's other record {left_by!r} states other "
                                "artifacts or dvc.lock digests (one batch is one rebuild)")
            continue
        if last is not None and lock.get("before") != last[1].get("after"):
            state = {}  # a build ran in between (dvc.lock changed): the log does not follow it
        starts = {path: entry.get("before") for path, entry in artifacts.items() if isinstance(entry, dict)}
        starts.update(untouched)
        problems += [f"record of request {name!r}: {path} starts from {str(digest)[:16]}, but request "
                     f"{left_by!r} left it at {str(state[path])[:16]} (and dvc.lock did not change in between)"
                     for path, digest in sorted(starts.items()) if path in state and state[path] != digest]
        state.update({path: entry.get("after") for path, entry in artifacts.items() if isinstance(entry, dict)})
        state.update(untouched)
        last, left_by = batch, name
    return problems
