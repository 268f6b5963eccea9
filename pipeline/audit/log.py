"""Tamper-evident audit log of forget requests (DESIGN section 6), meant to hold against its own operator.

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

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import stat
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.audit.transparency import (
    Checkpoint,
    TransparencyError,
    consistency_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
)
from pipeline.data.dataset import write_bytes_atomic
from pipeline.forget.manifest import REQUEST_ID_PATTERN

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://legonet.dev/forget/v2"
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


def load_or_create_audit_key(path: Path, create: bool = True) -> bytes:
    """The project's HMAC key for sample IDs: 32 random bytes, created (mode 0600) on first use.

    ``create=False`` when the log already holds records: a re-created key would silently make every forgotten ID
    look "not forgotten", so a lost key is an error that says to restore it.
    """
    if not create and _read_secret(path) is None:
        raise AuditError(f"{path}: the audit (HMAC) key is missing, but the audit log has records keyed with it; "
                         "restore the key from your backup (a new key cannot check the old records)")
    key = _load_or_create_secret(path, lambda: os.urandom(AUDIT_KEY_BYTES))
    if len(key) != AUDIT_KEY_BYTES:
        raise AuditError(f"{path}: audit key is {len(key)} bytes, not {AUDIT_KEY_BYTES}; restore it")
    return key


def audit_key_id(audit_key: bytes) -> str:
    """Names an audit key in the records without revealing it: HMAC of a fixed label, 16 hex digits."""
    return hmac.new(audit_key, b"legonet audit key id", hashlib.sha256).hexdigest()[:16]


def load_or_create_signing_key(path: Path, create: bool = True) -> Ed25519PrivateKey:
    """The project's Ed25519 signing key (PEM PKCS8, unencrypted, mode 0600), created on first use."""

    def generate() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    if not create and _read_secret(path) is None:
        raise AuditError(f"{path}: the signing key is missing, but the audit log has records; restore it from "
                         "your backup (only a record signed by the old key can introduce a new one)")
    return _private_key(path, _load_or_create_secret(path, generate))


def _private_key(path: Path | str, data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{path}: not an unencrypted PEM private key ({exc}); restore it") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: holds a {type(key).__name__}, not an Ed25519 key; restore the right key")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 hex of the raw 32-byte public key: the key's fingerprint, in DSSE signatures and trust lists."""
    return sha256_hex(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_public_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    """The Ed25519 public keys in a PEM file (one or more blocks), by fingerprint."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{path}: cannot read the public key ({exc}); restore it") from exc
    keys = {}
    for block in _PEM_PUBLIC_KEY.findall(text):
        key = load_public_key(path, block.encode("ascii"))
        keys[key_id(key)] = key
    if not keys:
        raise AuditError(f"{path}: holds no PEM public key; restore it from git")
    return keys


def load_public_key(where: Path | str, pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise AuditError(f"{where}: unreadable public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{where}: holds a {type(key).__name__}; audit records use Ed25519")
    return key


def _load_or_create_secret(path: Path, generate: Callable[[], bytes]) -> bytes:
    """Read a secret file, or create it with ``generate()``; never replace one that exists.

    Losing a key is unrecoverable (old HMACs become uncheckable), so creation goes through a private temporary
    file (``O_EXCL | O_NOFOLLOW``: never through a planted link) and ``os.link``, which fails instead of
    overwriting when another process created the key first.
    """
    existing = _read_secret(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a crashed attempt by this pid
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(generate())
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        pass  # another process won the race; its key is the key
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    created = _read_secret(path)  # ours, or the race winner's
    if created is None:
        raise AuditError(f"{path}: key vanished while it was being created; check what else writes there")
    return created


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (a created key must survive a crash that follows)."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_secret(path: Path) -> bytes | None:
    """The secret's bytes, ``None`` if absent; refuse a link, a non-file, or a key others can read (as ssh does)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"{path}: cannot open key ({exc.strerror}); it must be a regular file, not a link") from exc
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"{path}: not a regular file; restore the key file")
        if info.st_mode & 0o077:
            raise AuditError(f"{path}: key is open to other users (mode {info.st_mode & 0o777:o}); "
                             f"run chmod 600 {path}")
        return handle.read()


def seal(audit_key: bytes, value: dict[str, Any]) -> str:
    """Encrypt a record's free-text fields (AES-256-GCM, random nonce) under a key derived from the audit key."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    sealed = AESGCM(_seal_key(audit_key)).encrypt(nonce, canonical_json(value), _SEAL_LABEL)
    return base64.b64encode(nonce + sealed).decode("ascii")


def unseal(audit_key: bytes, sealed: str) -> dict[str, Any]:
    """The sealed fields, or an AuditError if they were not sealed under this audit key or were changed."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        data = base64.b64decode(sealed, validate=True)
        value = json.loads(AESGCM(_seal_key(audit_key)).decrypt(data[:12], data[12:], _SEAL_LABEL))
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise AuditError("sealed fields do not open under this audit key") from exc
    if not isinstance(value, dict):
        raise AuditError("sealed fields are not a JSON object")
    return value


_SEAL_LABEL = b"legonet sealed record fields v1"


def _seal_key(audit_key: bytes) -> bytes:
    return hmac.new(audit_key, _SEAL_LABEL, hashlib.sha256).digest()


# --- statements and envelopes ---


def id_digest(audit_key: bytes, sample_id: str) -> str:
    """HMAC-SHA256 hex of a sample ID: what the log stores instead of the ID."""
    return hmac.digest(audit_key, sample_id.encode("utf-8"), "sha256").hex()  # the one-shot C path: a forget
    # digests every training and test ID to find forgotten ones that are back


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
                isinstance(s, dict) and isinstance(s.get("keyid"), str) and isinstance(s.get("sig"), str)
                for s in signatures):
            raise ValueError("signatures must be a non-empty list of {keyid, sig}")
        return envelope, base64.b64decode(envelope.get("payload", ""), validate=True)
    except _DECODE_ERRORS as exc:
        raise AuditError(f"bad envelope: {exc}") from exc


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


# --- the log ---

FORGET = "forget"
KEY_ROTATION = "key-rotation"
TRUSTED_KEYS_ENV = "LEGONET_TRUSTED_KEYS"


@dataclass(frozen=True)
class _Entry:
    """A record file, as its name describes it (which ``verify`` checks against its content)."""

    sequence: int
    request_id: str
    path: Path


# What a forget reads of each forget record; ``summaries`` hands these out without parsing every record again.
SUMMARY_FIELDS = ("request_id", "forgotten_ids", "audit_key_id")
_MEMO_FORMAT = 1


@dataclass
class _Scan:
    """What one pass over the log found: its problems, its records and the keys trusted at its end."""

    problems: list[str]
    entries: list[_Entry]
    blobs: list[bytes]  # each record file's bytes, as verified (empty in a scan loaded from the memo)
    digests: list[str]  # their sha256: the chain's links, and how a later pass knows a record is unchanged
    leaves: list[bytes]  # their RFC 6962 leaf hashes (empty in a scan loaded from the memo)
    summaries: list[dict[str, Any]]  # per record: its kind and SUMMARY_FIELDS ({} when it does not decode)
    active: set[str]  # fingerprints allowed to sign the next record
    keys: dict[str, Ed25519PublicKey]  # public keys known: the published file plus rotation records
    trusted: frozenset[str]  # the reader's trust the pass started from
    public_key_file: str | None  # sha256 of the published key file the pass read (None: missing)


# log folder -> (the state of its files and the reader's trust, the verified scan of that state)
_SCANS: dict[Path, tuple[Any, _Scan]] = {}
# record file -> (its lstat, when it was read, what ``_read_record`` returned)
_READS: dict[Path, tuple[tuple[int, ...], int, tuple[bytes, str, bytes]]] = {}
_RACY_NS = 2_000_000_000  # a file changed this close to being read may change again and keep its lstat


def _read_record(path: Path) -> tuple[bytes, str, bytes]:
    """A record file's bytes, sha256 and Merkle leaf hash, read again only when its lstat (inode, size, mtime,
    ctime) changed.

    Each pass must know every record's digest; reading and hashing all of them (~47 KB each) cost ~15 ms per
    pass at 200 records, several passes per forget. An edit keeps the lstat only when it lands within the
    filesystem clock's tick of the change the cache saw, so, as git does with its index, a file whose last
    change came less than ``_RACY_NS`` before it was read is read again every time. Nobody can set ctime.
    """
    found = path.lstat()
    key = (found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)
    cached = _READS.get(path)
    if cached is not None and cached[0] == key and found.st_ctime_ns < cached[1] - _RACY_NS:
        return cached[2]
    started = time.time_ns()
    data = path.read_bytes()
    read = (data, sha256_hex(data), leaf_hash(data))
    _READS[path] = (key, started, read)
    return read


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
                             f"{_short(scan.active)}); pin its fingerprint, or rotate to it with the current key")
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
                     "new_key_id": key_id(new_key), "new_public_key": public_key_pem(new_key).decode("ascii")}
        path = self.append(predicate, {"audit/signing-key.pub": key_id(new_key)}, old_key)
        self._publish(new_key, read_public_keys(self.public_key_path))
        return path

    def size(self) -> int:
        """How many record files the log holds (not verified: for "is this log empty" before any key exists)."""
        return len(self._listing()[0])

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

    def find_id(self, audit_key: bytes, sample_id: str) -> list[str]:
        """The request ids whose record lists ``sample_id`` (by its HMAC) among the forgotten IDs."""
        digest = id_digest(audit_key, sample_id)
        return [s["request_id"] for s in self.summaries() if digest in s["forgotten_ids"]]

    def verify(self) -> list[str]:
        """Every problem found in the log, one line each naming the file(s); empty when the log is intact."""
        return self._scan().problems

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
        return [entry.path.read_bytes() for entry in self._listing()[0]]

    def checkpoint(self, origin: str, key: Ed25519PrivateKey) -> str:
        """A signed C2SP checkpoint of the log as it is now (verified first), by the key trusted to sign it."""
        scan = self._checked()
        if key_id(key.public_key()) not in scan.active:
            raise AuditError(f"signing key {key_id(key.public_key())[:16]} is not trusted to sign this log")
        return Checkpoint(origin, len(scan.leaves), root_hash(scan.leaves)).sign(key)

    def extends(self, note: str) -> list[str]:
        """Problems proving that the log extends the signed checkpoint ``note`` (consistency proof); empty if so."""
        scan = self._scan()
        return _extension_problems(note, scan.keys, self.trusted | scan.active, scan.leaves)

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
        signature and decodes it, ~0.3 ms a record, which grew each forget by ~0.2 s per 200 requests.

        The state is each record file's sha256 (see ``_read_record``), the stray files, the public key file's
        sha256 and the reader's trust and anchors.
        """
        entries, strays = self._listing()
        reads = [_read_record(entry.path) for entry in entries]
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
            scan.problems += [f"{where}: {p}" for p in _extension_problems(note, scan.keys,
                                                                            self.trusted | scan.active, leaves)]
        _SCANS[self.log_dir.resolve()] = (state, scan)
        if not scan.problems and (memo is None or memo.digests != digests):
            self._write_memo(scan)
        return scan

    def _continues(self, earlier: _Scan, entries: list[_Entry], digests: list[str], key_file: str | None) -> bool:
        """Whether this log starts with exactly the records of ``earlier``, a clean pass under the same trust."""
        size = len(earlier.entries)
        return (not earlier.problems and earlier.trusted == self.trusted and earlier.public_key_file == key_file
                and 0 < size <= len(entries) and earlier.digests == digests[:size]
                and [e.path.name for e in earlier.entries] == [e.path.name for e in entries[:size]])

    def _verify(self, entries: list[_Entry], blobs: list[bytes], digests: list[str], leaves: list[bytes],
                key_file: str | None, strays: list[Path], prefix: _Scan | None) -> _Scan:
        """Check the records after ``prefix`` (all of them without one), carrying on from the state it left."""
        problems = [f"{path}: not a record (a regular file named NNNNNN-<request_id>.json)" for path in strays]
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
            found = _order_problems(entry, before, first_of.setdefault(entry.request_id, entry))
            summary: dict[str, Any] = {}
            try:
                envelope, payload = parse_envelope(data)
                signers = [s["keyid"] for s in envelope["signatures"]]
                found += _signature_problems(envelope, payload, keys, active)
                predicate = parse_statement(payload)["predicate"]
            except AuditError as exc:
                found.append(f"undecodable audit record: {exc}")
            else:
                found += _chain_problems(entry, predicate, before, digests[index - 1] if index else None)
                if predicate.get("signing_key_id") not in signers:
                    found.append(f"the record names signing key {str(predicate.get('signing_key_id'))[:16]}, "
                                 f"its signature is by {_short(signers)}")
                if predicate.get("kind") == KEY_ROTATION and not found:
                    found += _rotate(predicate, keys, active, signers)
                summary = {"kind": predicate.get("kind"), **{f: predicate.get(f) for f in SUMMARY_FIELDS},
                           "forgotten_ids": _as_list(predicate.get("forgotten_ids"))}
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
                match = _RECORD_NAME.fullmatch(name)
                if match is None or not _SHA256_HEX.fullmatch(digest) or set(summary) != {"kind", *SUMMARY_FIELDS}:
                    return None
                entries.append(_Entry(int(match[1]), match[2], self.log_dir / name))
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
        """Keep a clean pass for the next one. Only beside an existing key dir; a memo that cannot be written
        (a read-only key dir) costs later passes time, never correctness, so the error is not raised."""
        if self.memo is None or not self.memo.parent.is_dir():
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

    def _listing(self) -> tuple[list[_Entry], list[Path]]:
        """The record files (regular files only: a planted FIFO or link must not block or redirect a reader) in
        sequence order, and the strays: other ``*.json`` files, or links and FIFOs named like records."""
        entries, strays = [], []
        with os.scandir(self.log_dir) if self.log_dir.is_dir() else nullcontext(iter(())) as listing:
            for item in listing:
                if not item.name.endswith(".json") or item.name.startswith("."):
                    continue
                match = _RECORD_NAME.fullmatch(item.name)
                if match and item.is_file(follow_symlinks=False):
                    entries.append(_Entry(int(match[1]), match[2], self.log_dir / item.name))
                else:
                    strays.append(self.log_dir / item.name)
        return sorted(entries, key=lambda e: (e.sequence, e.path.name)), sorted(strays)


def _open_checkpoint(note: str, keys: dict[str, Ed25519PublicKey], trusted: Collection[str]) -> Checkpoint:
    """The checkpoint in ``note`` if one of the trusted keys signed it."""
    for fingerprint in sorted(trusted):
        if fingerprint in keys:
            try:
                return Checkpoint.open(note, keys[fingerprint])
            except TransparencyError as exc:
                if "no signature by" not in str(exc):
                    raise
    raise AuditError(f"not signed by a trusted key ({_short(trusted)})")


def _extension_problems(note: str, keys: dict[str, Ed25519PublicKey], trusted: Collection[str],
                        leaves: list[bytes]) -> list[str]:
    """Why the log (its ``leaves`` hashes) does not extend the signed checkpoint ``note``; a consistency proof
    decides."""
    try:
        old = _open_checkpoint(note, keys, trusted)
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


def _signature_problems(envelope: dict[str, Any], payload: bytes, keys: dict[str, Ed25519PublicKey],
                        active: set[str]) -> list[str]:
    problems = []
    message = pae(PAYLOAD_TYPE, payload)
    for signature in envelope["signatures"]:
        keyid = signature["keyid"]
        if keyid not in active:
            problems.append(f"signed by key {keyid[:16]}, which is not trusted to sign here (trusted: "
                            f"{_short(active)}): a substituted or unpinned key")
            continue
        public_key = keys.get(keyid)
        if public_key is None:
            problems.append(f"signed by trusted key {keyid[:16]}, whose public key is missing from "
                            "audit/signing-key.pub; restore it from git")
            continue
        try:
            public_key.verify(base64.b64decode(signature["sig"], validate=True), message)
        except (InvalidSignature, binascii.Error):
            problems.append(f"bad signature by key {keyid[:16]}: modified after signing")
    return problems


def _rotate(predicate: dict[str, Any], keys: dict[str, Ed25519PublicKey], active: set[str],
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


def _short(fingerprints: Collection[str]) -> str:
    return ", ".join(sorted(f[:16] for f in fingerprints)) or "none"


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
