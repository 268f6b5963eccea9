"""Tamper-evident audit log of forget requests (docs/design.md sections 6, 9), meant to hold against its own operator.

Each record is an in-toto Statement v1 in a DSSE envelope signed with Ed25519, stored as one file per request
(``NNNNNN-<request_id>.json``, canonical JSON plus a newline) so that git diffs and merges stay readable. The
records form a hash chain (each predicate holds ``sequence`` 1, 2, ... and ``previous``, the SHA-256 of the
previous record file) and are the leaves of an RFC 6962 Merkle tree, whose signed checkpoints
(``audit.transparency``) anchor the log's head outside it: dropping the newest records, or rolling the log back,
is caught by anyone who kept a later checkpoint.

Trust does not come from the repository. ``AuditLog`` is given the fingerprints (``key_id``) of the signing keys
its reader trusts, from outside the project (the key directory, an environment variable, a flag); a record signed
by any other key does not verify, whatever ``audit/signing-key.pub`` says. Every record names its signing key in
the signed predicate (``signing_key_id``); a key rotation is itself a record, signed by the old key, that names the
new one. Every command that reads records goes through ``records`` (or ``summaries``), which verify the whole log
first and refuse one that does not verify; the key holder's own reads may skip re-checking record files, byte for
byte those a pass under the same trust already verified (``AuditLog``'s memo).

Two secrets stay outside git: the signing key (Ed25519, PEM PKCS8) and the audit key, an HMAC key under which
everything derived from raw sample IDs is stored (``id_digest``; the manifest's digest too). The log is public, so
it never holds a raw sample ID, nor anything that lets a reader test a guessed ID: IDs such as ``mnist-00042`` are
guessable, and a plain hash would confirm a guess. The requester's free text (``reason``, ``received_at``) is
sealed (AES-GCM under a key derived from the audit key): readable by whoever holds the audit key, opaque to others.
Records name their audit key by ``audit_key_id``, so a wrong or re-created key is an error, never a silent
"not forgotten".
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.audit.checks import (
    AUDIT_KEY_ROTATION,
    FORGET,
    KEY_ROTATION,
    Entry,
    as_list,
    chain_problems,
    extension_problems,
    in_force,
    keying_problems,
    order_problems,
    rotate,
    short_fingerprints,
    signature_problems,
)
from pipeline.audit.envelope import (
    SHA256_HEX,
    canonical_json,
    key_id,
    parse_envelope,
    parse_statement,
    sha256_hex,
    sign_envelope,
    statement,
)
from pipeline.audit.folder import RECORD_NAME, listing, read_record, stray_reason
from pipeline.audit.secrets import audit_key_id, forgotten_by, load_public_key, public_key_pem, read_public_keys
from pipeline.audit.transparency import (
    Checkpoint,
    root_hash,
)
from pipeline.data.dataset import write_bytes_atomic
from pipeline.data.ids import REQUEST_ID_PATTERN
from pipeline.errors import AuditError

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


# --- the log ---

TRUSTED_KEYS_ENV = "LEGONET_TRUSTED_KEYS"


# What a forget reads of each forget record; ``summaries`` hands these out without parsing every record again.
# (An audit-key rotation's ``audit_key_id`` is the key it introduces: the summaries say which key is in force.)
SUMMARY_FIELDS = ("request_id", "forgotten_ids", "audit_key_id")
_MEMO_FORMAT = 1


@dataclass
class _Scan:
    """What one pass over the log found: its problems, its records and the keys trusted at its end."""

    problems: list[str]
    entries: list[Entry]
    blobs: list[bytes]  # each record file's bytes, as verified (empty in a scan loaded from the memo)
    digests: list[str]  # their sha256: the chain's links, and how a later pass knows a record is unchanged
    leaves: list[bytes]  # their RFC 6962 leaf hashes (empty in a scan loaded from the memo)
    summaries: list[dict[str, Any]]  # per record: its kind and SUMMARY_FIELDS ({} when it does not decode)
    active: set[str]  # fingerprints allowed to sign the next record
    keys: dict[str, Ed25519PublicKey]  # public keys known: the published file plus rotation records
    trusted: frozenset[str]  # the reader's trust the pass started from
    public_key_file: str | None  # sha256 of the published key file the pass read (None: missing)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# log folder -> (the state of its files and the reader's trust, the verified scan of that state)
_SCANS: dict[Path, tuple[Any, _Scan]] = {}
class AuditLog:
    """The audit log in ``log_dir``, trusted only as far as the signing-key fingerprints in ``trusted`` reach.

    ``public_key_path`` (git-tracked) supplies key *material* only; a key is trusted when its fingerprint is in
    ``trusted`` (given by the reader, from outside the repository) or was introduced by a rotation record signed
    by a trusted key. ``anchors`` are signed checkpoints kept outside the log: a log that does not extend each
    one (records dropped, rolled back or rewritten) does not verify. Appends are not locked here: the forget
    flow holds the project lock, so there is one writer.

    ``memo`` (a file beside the signing key, for the key holder's own reads) keeps the result of the last clean
    pass: which record files, by sha256, verified under this trust, and what the chain and key rotations left.
    A later pass whose log starts with exactly those bytes checks only the records after them, so a forget's
    cost does not grow with the log's history. It vouches for nothing an attacker could not sign: whoever can
    write it can read the signing key next to it. Readers who do not hold the key (``legonet audit verify``)
    pass no memo and verify every record.
    """

    def __init__(self, log_dir: Path, public_key_path: Path, trusted: Collection[str] = (),
                 anchors: Collection[tuple[str, str]] = (), memo: Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.public_key_path = Path(public_key_path)
        self.trusted = frozenset(trusted)
        self.anchors = tuple(anchors)  # (where it was kept, signed checkpoint): the log must extend each
        self.memo = memo

    def append(self, predicate: dict[str, Any], subjects: dict[str, str], key: Ed25519PrivateKey) -> Path:
        """Sign and write the next record; return its path. ``predicate`` is copied, not modified.

        Refuses when the log does not verify (a record chained onto tampered history would vouch for it), when
        ``request_id`` already has a record, or when ``key`` is not the key trusted to sign the next record.
        """
        request_id = predicate.get("request_id")
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise AuditError(f"predicate request_id {request_id!r} must match {REQUEST_ID_PATTERN}")
        if {"previous", "sequence", "signing_key_id"} & set(predicate):
            raise AuditError("predicate must not set 'previous', 'sequence' or 'signing_key_id'; the log sets them")
        scan = self._scan()
        if scan.problems:
            raise AuditError(f"{self.log_dir}: refusing to append to a log that does not verify "
                             f"({len(scan.problems)} problem(s), first: {scan.problems[0]}); restore it from git")
        signer = key_id(key.public_key())
        if signer not in scan.active:
            raise AuditError(f"signing key {signer[:16]} is not trusted to sign this log (trusted: "
                             f"{short_fingerprints(scan.active)}); pin its fingerprint, or rotate to it with the "
                             "current key")
        if any(entry.request_id == request_id for entry in scan.entries):
            raise AuditError(f"{self.log_dir}: request {request_id!r} already has an audit record")
        self._publish(key.public_key(), scan.keys)
        last = scan.entries[-1] if scan.entries else None
        sequence = last.sequence + 1 if last else 1
        previous = scan.digests[-1] if last else None
        chained = {"kind": FORGET, **predicate, "previous": previous, "sequence": sequence,
                   "signing_key_id": signer}
        envelope = sign_envelope(statement(subjects, chained), key)
        path = self.log_dir / f"{sequence:06d}-{request_id}.json"
        write_bytes_atomic(path, canonical_json(envelope) + b"\n")
        return path

    def rotate(self, old_key: Ed25519PrivateKey, new_key: Ed25519PublicKey) -> Path:
        """Append a key-rotation record, signed by ``old_key``, after which ``new_key`` signs in its place."""
        sequence = self.size() + 1
        predicate = {"kind": KEY_ROTATION, "request_id": f"{KEY_ROTATION}-{sequence:06d}",
                     "new_key_id": key_id(new_key), "new_public_key": public_key_pem(new_key).decode("ascii"),
                     "recorded_at": _now()}
        path = self.append(predicate, {"audit/signing-key.pub": key_id(new_key)}, old_key)
        self._publish(new_key, read_public_keys(self.public_key_path))
        return path

    def rotate_audit_key(self, old_key: bytes, new_key: bytes, signing: Ed25519PrivateKey) -> Path:
        """Append an audit-key rotation record: the forgets after it are keyed with ``new_key`` (by key id only:
        the record reveals neither key)."""
        sequence = self.size() + 1
        new_id = audit_key_id(new_key)
        predicate = {"kind": AUDIT_KEY_ROTATION, "request_id": f"{AUDIT_KEY_ROTATION}-{sequence:06d}",
                     "old_audit_key_id": audit_key_id(old_key), "new_audit_key_id": new_id, "recorded_at": _now()}
        return self.append(predicate, {"audit-key": sha256_hex(new_id.encode("ascii"))}, signing)

    def audit_key_ids(self) -> list[str]:
        """The audit key ids the verified log names, oldest first; the last keys the next record."""
        ids: list[str] = []
        for summary in self._checked().summaries:
            named = summary.get("audit_key_id")
            if summary.get("kind") in (FORGET, AUDIT_KEY_ROTATION) and named and named not in ids:
                ids.append(named)
        return ids

    def size(self) -> int:
        """How many record files the log holds (not verified: for "is this log empty" before any key exists)."""
        return len(listing(self.log_dir)[0])

    def records(self) -> list[dict[str, Any]]:
        """The forget statements in sequence order, after verifying the whole log; refuses a log that does not."""
        scan = self._checked()
        return [parse_statement(parse_envelope(blob)[1])
                for blob, summary in zip(scan.blobs, scan.summaries, strict=True) if summary.get("kind") == FORGET]

    def summaries(self) -> list[dict[str, Any]]:
        """Of each forget record, the predicate's SUMMARY_FIELDS (``forgotten_ids`` always a list), verified as
        ``records`` is: what a forget checks requests and IDs against, without decoding every record again."""
        return [{field: summary[field] for field in SUMMARY_FIELDS}
                for summary in self._checked().summaries if summary.get("kind") == FORGET]

    def find(self, request_id: str) -> dict[str, Any] | None:
        """The statement recorded for ``request_id``, if any."""
        return next((s for s in self.records() if s["predicate"].get("request_id") == request_id), None)

    def find_id(self, audit_keys: Collection[bytes], sample_id: str) -> list[str]:
        """The request ids whose record lists ``sample_id`` (by its HMAC under the record's own audit key, one of
        ``audit_keys``) among the forgotten IDs."""
        return forgotten_by(self.summaries(), audit_keys)([sample_id]).get(sample_id, [])

    def verify(self) -> list[str]:
        """Every problem found in the log, one line each naming the file(s); empty when the log is intact (a copy:
        a caller that adds its own problems must not make the verified scan fail)."""
        return list(self._scan().problems)

    def active_keys(self) -> set[str]:
        """The fingerprints trusted to sign the next record (the pinned ones, as rotations left them)."""
        return self._scan().active

    def public_key(self, fingerprint: str) -> Ed25519PublicKey:
        """The public key with this fingerprint, from the published file or a rotation record."""
        keys = self._scan().keys
        if fingerprint not in keys:
            raise AuditError(f"no public key {fingerprint[:16]} in {self.public_key_path}")
        return keys[fingerprint]

    def leaf_data(self) -> list[bytes]:
        """The Merkle leaves' data: the record files' bytes, in sequence order."""
        return [entry.path.read_bytes() for entry in listing(self.log_dir)[0]]

    def checkpoint(self, origin: str, key: Ed25519PrivateKey) -> str:
        """A signed C2SP checkpoint of the log as it is now (verified first), by the key trusted to sign it."""
        scan = self._checked()
        if key_id(key.public_key()) not in scan.active:
            raise AuditError(f"signing key {key_id(key.public_key())[:16]} is not trusted to sign this log")
        return Checkpoint(origin, len(scan.leaves), root_hash(scan.leaves)).sign(key)

    def extends(self, note: str) -> list[str]:
        """Problems proving that the log extends the signed checkpoint ``note`` (consistency proof); empty if so."""
        scan = self._scan()
        return extension_problems(note, scan.keys, self.trusted | scan.active, scan.leaves)

    def _checked(self) -> _Scan:
        """The scan of a log that verifies; any problem refuses every use of its records."""
        scan = self._scan()
        if scan.problems:
            shown = "; ".join(scan.problems[:3]) + (f" (and {len(scan.problems) - 3} more)"
                                                     if len(scan.problems) > 3 else "")
            raise AuditError(f"{self.log_dir}: the audit log does not verify, so nothing in it is used: {shown}; "
                             "`legonet audit verify` lists every problem")
        return scan

    def _scan(self) -> _Scan:
        """Verify the log, once per state of its files (a forget reads it about ten times: request checks, the
        audit key, the quality stage, append, checkpoint), and only past the longest prefix an earlier clean
        pass verified (this process's last pass, else the memo): a full pass checks every record's Ed25519
        signature and decodes it, so full passes would make each forget grow with the log.

        The state is each record file's sha256 (see ``_read_record``), the stray files, the public key file's
        sha256 and the reader's trust and anchors.
        """
        entries, strays = listing(self.log_dir)
        reads = [read_record(entry.path) for entry in entries]
        blobs, digests, leaves = ([read[i] for read in reads] for i in range(3))
        key_file = sha256_hex(self.public_key_path.read_bytes()) if self.public_key_path.is_file() else None
        state = (tuple(map(str, strays)), tuple(zip([e.path.name for e in entries], digests, strict=True)),
                 key_file, self.trusted, self.anchors)
        cached = _SCANS.get(self.log_dir.resolve())
        if cached is not None and cached[0] == state:
            return cached[1]
        memo = self._read_memo()
        prefix = max((s for s in (cached[1] if cached else None, memo)
                      if s is not None and self._continues(s, entries, digests, key_file)),
                     key=lambda s: len(s.entries), default=None)
        scan = self._verify(entries, blobs, digests, leaves, key_file, strays, prefix)
        for where, note in self.anchors:
            scan.problems += [f"{where}: {p}" for p in extension_problems(note, scan.keys,
                                                                            self.trusted | scan.active, leaves)]
        _SCANS[self.log_dir.resolve()] = (state, scan)
        if not scan.problems and (memo is None or memo.digests != digests):
            self._write_memo(scan)
        return scan

    def _continues(self, earlier: _Scan, entries: list[Entry], digests: list[str], key_file: str | None) -> bool:
        """Whether this log starts with exactly the records of ``earlier``, a clean pass under the same trust."""
        size = len(earlier.entries)
        return (not earlier.problems and earlier.trusted == self.trusted and earlier.public_key_file == key_file
                and 0 < size <= len(entries) and earlier.digests == digests[:size]
                and [e.path.name for e in earlier.entries] == [e.path.name for e in entries[:size]])

    def _verify(self, entries: list[Entry], blobs: list[bytes], digests: list[str], leaves: list[bytes],
                key_file: str | None, strays: list[Path], prefix: _Scan | None) -> _Scan:
        """Check the records after ``prefix`` (all of them without one), carrying on from the state it left."""
        problems = [f"{path}: {stray_reason(path, self.log_dir)}" for path in strays]
        keys: dict[str, Ed25519PublicKey] = {}
        if entries or self.anchors:
            try:
                keys = read_public_keys(self.public_key_path)
            except AuditError as exc:
                problems.append(str(exc))
            if not self.trusted:
                problems.append("no trusted signing-key fingerprint was given, so no record can be trusted: set "
                                f"{TRUSTED_KEYS_ENV}, write the key dir's trusted-keys file, or pass --trusted-key")
        start = len(prefix.entries) if prefix else 0
        active = set(prefix.active) if prefix else set(self.trusted)
        keys.update(prefix.keys if prefix else {})
        summaries = list(prefix.summaries) if prefix else []
        first_of = {entry.request_id: entry for entry in reversed(entries[:start])}
        for index in range(start, len(entries)):
            entry, data = entries[index], blobs[index]
            before = entries[index - 1] if index else None
            found = order_problems(entry, before, first_of.setdefault(entry.request_id, entry))
            summary: dict[str, Any] = {}
            try:
                envelope, payload = parse_envelope(data)
                signers = [s.get("keyid", "") for s in envelope["signatures"]]
                found += signature_problems(envelope, payload, keys, active)
                predicate = parse_statement(payload)["predicate"]
            except AuditError as exc:
                found.append(f"undecodable audit record: {exc}")
            else:
                found += chain_problems(entry, predicate, before, digests[index - 1] if index else None)
                if predicate.get("signing_key_id") not in signers:
                    found.append(f"the record names signing key {str(predicate.get('signing_key_id'))[:16]}, "
                                 f"its signature is by {short_fingerprints(signers)}")
                found += keying_problems(predicate, in_force(summaries))
                if predicate.get("kind") == KEY_ROTATION and not found:
                    found += rotate(predicate, keys, active, signers)
                summary = {"kind": predicate.get("kind"), **{f: predicate.get(f) for f in SUMMARY_FIELDS},
                           "forgotten_ids": as_list(predicate.get("forgotten_ids"))}
                if predicate.get("kind") == AUDIT_KEY_ROTATION:
                    summary["audit_key_id"] = predicate.get("new_audit_key_id")
            summaries.append(summary)
            problems += [f"{entry.path.name}: {problem}" for problem in found]
        return _Scan(problems, entries, blobs, digests, leaves, summaries, active, keys, self.trusted, key_file)

    def _read_memo(self) -> _Scan | None:
        """The clean pass kept in ``memo`` for this log and trust; None when there is none or it does not parse
        (then the pass verifies every record, as a reader without the memo does)."""
        if self.memo is None or not self.memo.is_file():
            return None
        try:
            memo = json.loads(self.memo.read_bytes())
            if memo["format"] != _MEMO_FORMAT or memo["log"] != str(self.log_dir.resolve()):
                return None
            entries = []
            for name, digest, summary in memo["records"]:
                match = RECORD_NAME.fullmatch(name)
                if match is None or not SHA256_HEX.fullmatch(digest) or set(summary) != {"kind", *SUMMARY_FIELDS}:
                    return None
                entries.append(Entry(int(match[1]), match[2], self.log_dir / name))
            keys = {fingerprint: load_public_key(self.memo, pem.encode("ascii"))
                    for fingerprint, pem in memo["keys"].items()}
            if any(key_id(key) != fingerprint for fingerprint, key in keys.items()):
                return None
            return _Scan([], entries, [], [digest for _, digest, _ in memo["records"]], [],
                         [summary for _, _, summary in memo["records"]], set(memo["active"]), keys,
                         frozenset(memo["trusted"]), memo["public_key_file"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, AuditError):
            return None

    def _write_memo(self, scan: _Scan) -> None:
        """Keep a clean pass for the next one. Only beside an existing key dir, and of a log with records (an empty
        one costs nothing to verify, and a refused command must leave the key dir as it was); a memo that cannot be
        written (a read-only key dir) costs later passes time, never correctness, so the error is not raised."""
        if self.memo is None or not self.memo.parent.is_dir() or not scan.entries:
            return
        memo = {"format": _MEMO_FORMAT, "log": str(self.log_dir.resolve()), "trusted": sorted(scan.trusted),
                "public_key_file": scan.public_key_file, "active": sorted(scan.active),
                "keys": {fingerprint: public_key_pem(key).decode("ascii") for fingerprint, key in scan.keys.items()},
                "records": [[entry.path.name, digest, summary]
                            for entry, digest, summary in zip(scan.entries, scan.digests, scan.summaries,
                                                              strict=True)]}
        try:
            write_bytes_atomic(self.memo, canonical_json(memo))
        except (OSError, AuditError):
            return

    def _publish(self, public_key: Ed25519PublicKey, known: dict[str, Ed25519PublicKey]) -> None:
        """Add the key's PEM to the public key file (material for verifiers; trust comes from fingerprints)."""
        if key_id(public_key) in known and self.public_key_path.exists():
            return
        existing = self.public_key_path.read_bytes() if self.public_key_path.exists() else b""
        write_bytes_atomic(self.public_key_path, existing + public_key_pem(public_key))
