"""Tamper-evident audit log of forget requests (DESIGN section 6).

Each record is an in-toto Statement v1 in a DSSE envelope signed with Ed25519, stored as one file per request
(``NNNNNN-<request_id>.json``, canonical JSON plus a newline) so that git diffs and merges stay readable. The
records form a hash chain: each predicate holds ``sequence`` (1, 2, ...) and ``previous``, the SHA-256 of the
previous record file's bytes. Editing, dropping, reordering or re-signing a record is therefore visible to
``AuditLog.verify``; dropping the *newest* record is not (nothing follows it), which is why the forget flow
also checks that the current artifacts match the last record and why the log lives in git.

Two secrets stay outside git: the signing key (Ed25519, PEM PKCS8) and the audit key, an HMAC key under
which sample IDs are stored (``id_digest``). The log itself is public, so it never holds a raw sample ID:
IDs such as ``mnist-00042`` are guessable, and a plain hash would let anyone test a guess. A data subject
who knows their ID can still ask for ``find_id``. The public key file (``public_key_path``, git-tracked) may
hold several PEM keys, so a rotated signing key can be added without re-signing history.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.dataset import write_bytes_atomic
from pipeline.manifest import REQUEST_ID_PATTERN

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://legonet.dev/forget/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
AUDIT_KEY_BYTES = 32
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_RECORD_NAME = re.compile(r"(\d{6,})-(" + REQUEST_ID_PATTERN.removeprefix("^").removesuffix("$") + r")\.json")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PEM_PUBLIC_KEY = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class AuditError(Exception):
    """The audit log or its keys cannot be used as asked; the message names the file and the fix."""


def canonical_json(value: object) -> bytes:
    """The one byte encoding of a JSON value that is signed and hashed: sorted keys, no spaces, UTF-8."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit record is not plain JSON data: {exc}") from exc
    return text.encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- keys ---


def load_or_create_audit_key(path: Path) -> bytes:
    """The project's HMAC key for sample IDs: 32 random bytes, created (mode 0600) on first use."""
    key = _load_or_create_secret(path, lambda: os.urandom(AUDIT_KEY_BYTES))
    if len(key) != AUDIT_KEY_BYTES:
        raise AuditError(f"{path}: audit key is {len(key)} bytes, not {AUDIT_KEY_BYTES}; restore it")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The project's Ed25519 signing key (PEM PKCS8, unencrypted, mode 0600), created on first use."""

    def generate() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    data = _load_or_create_secret(path, generate)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{path}: not an unencrypted PEM private key ({exc}); restore it") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: holds a {type(key).__name__}, not an Ed25519 key; restore the right key")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 hex of the raw 32-byte public key: names the key in DSSE signatures."""
    return sha256_hex(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def _load_or_create_secret(path: Path, generate: Callable[[], bytes]) -> bytes:
    """Read a secret file, or create it with ``generate()``; never replace one that exists.

    Losing a key is unrecoverable (old HMACs become uncheckable), so creation goes through a private temporary
    file and ``os.link``, which fails instead of overwriting when another process created the key first.
    """
    existing = _read_secret(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(generate())
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process won the race; its key is the key
    finally:
        tmp.unlink(missing_ok=True)
    created = _read_secret(path)  # ours, or the race winner's
    if created is None:
        raise AuditError(f"{path}: key vanished while it was being created; check what else writes there")
    return created


def _read_secret(path: Path) -> bytes | None:
    """The secret's bytes, ``None`` if absent; refuse a key other users can read, as ssh does."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"{path}: cannot read key: {exc.strerror}") from exc
    if os.name == "posix" and mode & 0o077:
        raise AuditError(f"{path}: key is open to other users (mode {mode & 0o777:o}); run chmod 600 {path}")
    return data


# --- statements and envelopes ---


def id_digest(audit_key: bytes, sample_id: str) -> str:
    """HMAC-SHA256 hex of a sample ID: what the log stores instead of the ID."""
    return hmac.new(audit_key, sample_id.encode("utf-8"), hashlib.sha256).hexdigest()


def statement(subjects: dict[str, str], predicate: dict[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 about ``subjects`` (artifact path -> SHA-256 hex), subjects sorted by name."""
    for name, digest in subjects.items():
        if not _SHA256_HEX.fullmatch(digest):
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
            "sig": base64.b64encode(key.sign(_pae(PAYLOAD_TYPE, payload))).decode("ascii"),
        }],
    }


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 PAE: binds payload type and payload, so a signature cannot be replayed for another type."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


_DECODE_ERRORS = (ValueError, TypeError, binascii.Error)  # ValueError covers JSON and UTF-8 errors


def _envelope(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A record file's DSSE envelope and its payload bytes, parsed without trusting them."""
    try:
        envelope = json.loads(data)
        if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
            raise ValueError(f"not a DSSE envelope with payloadType {PAYLOAD_TYPE}")
        signatures = envelope.get("signatures")
        if not isinstance(signatures, list) or not signatures or not all(
                isinstance(s, dict) and isinstance(s.get("keyid"), str) and isinstance(s.get("sig"), str)
                for s in signatures):
            raise ValueError("signatures must be a non-empty list of {keyid, sig}")
        return envelope, base64.b64decode(envelope.get("payload", ""), validate=True)
    except _DECODE_ERRORS as exc:
        raise AuditError(f"bad envelope: {exc}") from exc


def _statement(payload: bytes) -> dict[str, Any]:
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


# --- the log ---


@dataclass(frozen=True)
class _Entry:
    """A record file, as its name describes it (which ``verify`` checks against its content)."""

    sequence: int
    request_id: str
    path: Path


class AuditLog:
    """The audit log in ``log_dir``, verified against the public key(s) in ``public_key_path``.

    Appends are not locked here: the forget flow holds the project lock, so there is one writer.
    """

    def __init__(self, log_dir: Path, public_key_path: Path) -> None:
        self.log_dir = Path(log_dir)
        self.public_key_path = Path(public_key_path)

    def append(self, predicate: dict[str, Any], subjects: dict[str, str], key: Ed25519PrivateKey) -> Path:
        """Sign and write the next record; return its path. ``predicate`` is copied, not modified.

        Refuses when the log does not verify (a record chained onto tampered history would vouch for it), when
        ``request_id`` already has a record, or when ``key`` is not one of the published public keys.
        """
        request_id = predicate.get("request_id")
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise AuditError(f"predicate request_id {request_id!r} must match {REQUEST_ID_PATTERN}")
        if "previous" in predicate or "sequence" in predicate:
            raise AuditError("predicate must not set 'previous' or 'sequence'; the log sets them")
        self._publish(key)
        problems = self.verify()
        if problems:
            raise AuditError(f"{self.log_dir}: refusing to append to a log that does not verify "
                             f"({len(problems)} problem(s), first: {problems[0]}); restore it from git")
        entries = self._entries()
        if any(entry.request_id == request_id for entry in entries):
            raise AuditError(f"{self.log_dir}: request {request_id!r} already has an audit record")
        last = entries[-1] if entries else None
        sequence = last.sequence + 1 if last else 1
        previous = sha256_hex(last.path.read_bytes()) if last else None
        chained = {**predicate, "previous": previous, "sequence": sequence}
        envelope = sign_envelope(statement(subjects, chained), key)
        path = self.log_dir / f"{sequence:06d}-{request_id}.json"
        write_bytes_atomic(path, canonical_json(envelope) + b"\n")
        return path

    def records(self) -> list[dict[str, Any]]:
        """The decoded statements in sequence order. Unverified: call ``verify`` to trust them."""
        statements = []
        for entry in self._entries():
            try:
                statements.append(_statement(_envelope(entry.path.read_bytes())[1]))
            except AuditError as exc:
                raise AuditError(f"{entry.path}: undecodable audit record: {exc}") from exc
        return statements

    def find(self, request_id: str) -> dict[str, Any] | None:
        """The statement recorded for ``request_id``, if any."""
        return next((s for s in self.records() if s["predicate"].get("request_id") == request_id), None)

    def find_id(self, audit_key: bytes, sample_id: str) -> list[str]:
        """The request ids whose record lists ``sample_id`` (by its HMAC) among the forgotten IDs."""
        digest = id_digest(audit_key, sample_id)
        return [s["predicate"].get("request_id") for s in self.records()
                if digest in _as_list(s["predicate"].get("forgotten_ids"))]

    def verify(self) -> list[str]:
        """Every problem found in the log, one line each naming the file(s); empty when the log is intact."""
        problems = [f"{path}: not a record name (NNNNNN-<request_id>.json)" for path in self._strays()]
        entries = self._entries()
        try:
            keys = self._public_keys() if entries else {}
        except AuditError as exc:
            keys = {}
            problems.append(str(exc))
        before: _Entry | None = None
        before_digest: str | None = None
        first_of: dict[str, _Entry] = {}
        for entry in entries:
            data = entry.path.read_bytes()
            found = _order_problems(entry, before, first_of.setdefault(entry.request_id, entry))
            try:
                envelope, payload = _envelope(data)
                found += self._signature_problems(envelope, payload, keys)
                predicate = _statement(payload)["predicate"]
            except AuditError as exc:
                found.append(f"undecodable audit record: {exc}")
            else:
                found += _chain_problems(entry, predicate, before, before_digest)
            problems += [f"{entry.path.name}: {problem}" for problem in found]
            before, before_digest = entry, sha256_hex(data)
        return problems

    def _signature_problems(self, envelope: dict[str, Any], payload: bytes,
                            keys: dict[str, Ed25519PublicKey]) -> list[str]:
        problems = []
        message = _pae(PAYLOAD_TYPE, payload)
        for signature in envelope["signatures"]:
            public_key = keys.get(signature["keyid"])
            if public_key is None:
                unknown = signature["keyid"][:16]
                problems.append(f"signed by unknown key {unknown} (not in {self.public_key_path})")
                continue
            try:
                public_key.verify(base64.b64decode(signature["sig"], validate=True), message)
            except (InvalidSignature, binascii.Error):
                problems.append(f"bad signature by key {signature['keyid'][:16]}: modified after signing")
        return problems

    def _publish(self, key: Ed25519PrivateKey) -> None:
        """Write the public key on first use; afterwards the signing key must be one of those published."""
        public_key = key.public_key()
        if not self.public_key_path.exists():
            write_bytes_atomic(self.public_key_path, public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        elif key_id(public_key) not in self._public_keys():
            raise AuditError(f"{self.public_key_path}: lacks the signing key {key_id(public_key)[:16]}; use "
                             "the project's signing key, or add its public key there to rotate keys")

    def _public_keys(self) -> dict[str, Ed25519PublicKey]:
        path = self.public_key_path
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditError(f"{path}: cannot read the audit public key ({exc}); restore it") from exc
        keys = {}
        for block in _PEM_PUBLIC_KEY.findall(text):
            try:
                key = serialization.load_pem_public_key(block.encode("ascii"))
            except ValueError as exc:
                raise AuditError(f"{path}: unreadable public key ({exc}); restore it from git") from exc
            if not isinstance(key, Ed25519PublicKey):
                raise AuditError(f"{path}: holds a {type(key).__name__}; audit records use Ed25519")
            keys[key_id(key)] = key
        if not keys:
            raise AuditError(f"{path}: holds no PEM public key; restore it from git")
        return keys

    def _json_files(self) -> list[Path]:
        if not self.log_dir.is_dir():
            return []
        return sorted(p for p in self.log_dir.glob("*.json") if not p.name.startswith("."))

    def _entries(self) -> list[_Entry]:
        entries = []
        for path in self._json_files():
            match = _RECORD_NAME.fullmatch(path.name)
            if match:
                entries.append(_Entry(int(match[1]), match[2], path))
        return sorted(entries, key=lambda e: (e.sequence, e.path.name))

    def _strays(self) -> list[Path]:
        return [p for p in self._json_files() if not _RECORD_NAME.fullmatch(p.name)]


def _order_problems(entry: _Entry, before: _Entry | None, first_for_request: _Entry) -> list[str]:
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


def _chain_problems(entry: _Entry, predicate: dict[str, Any], before: _Entry | None,
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


def _as_list(value: object) -> list[Any]:
    """A list field of an unverified record, else empty (``in`` on a string would match substrings)."""
    return value if isinstance(value, list) else []
