"""The audit's secrets: the Ed25519 signing key, the HMAC audit key, and what is derived from them.

The audit key turns every sample ID into ``id_digest`` (HMAC-SHA256) before anything is written to the public log,
and seals the requester's free text (AES-GCM under a key derived from it); neither key ever enters git
(docs/design.md section 9).
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
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.audit.envelope import canonical_json, key_id
from pipeline.errors import AuditError

AUDIT_KEY_BYTES = 32
_PEM_PUBLIC_KEY = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def load_or_create_audit_key(path: Path, create: bool = True) -> bytes:
    """The project's HMAC key for sample IDs: 32 random bytes, created (mode 0600) on first use.

    ``create=False`` when the log already holds records: a re-created key would silently make every forgotten ID
    look "not forgotten", so a lost key is an error that says to restore it.
    """
    if not create and read_secret(path) is None:
        raise AuditError(f"{path}: the audit (HMAC) key is missing, but the audit log has records keyed with it; "
                         "restore the key from your backup (a new key cannot check the old records)")
    key = load_or_create_secret(path, lambda: os.urandom(AUDIT_KEY_BYTES))
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

    if not create and read_secret(path) is None:
        raise AuditError(f"{path}: the signing key is missing, but the audit log has records; restore it from "
                         "your backup (only a record signed by the old key can introduce a new one)")
    return _private_key(path, load_or_create_secret(path, generate))


def _private_key(path: Path | str, data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{path}: not an unencrypted PEM private key ({exc}); restore it") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: holds a {type(key).__name__}, not an Ed25519 key; restore the right key")
    return key


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


def load_or_create_secret(path: Path, generate: Callable[[], bytes]) -> bytes:
    """Read a secret file, or create it with ``generate()``; never replace one that exists.

    Losing a key is unrecoverable (old HMACs become uncheckable), so creation goes through a private temporary
    file (``O_EXCL | O_NOFOLLOW``: never through a planted link) and ``os.link``, which fails instead of
    overwriting when another process created the key first.
    """
    existing = read_secret(path)
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
    created = read_secret(path)  # ours, or the race winner's
    if created is None:
        raise AuditError(f"{path}: key vanished while it was being created; check what else writes there")
    return created


def keep_secret(path: Path, data: bytes) -> None:
    """Write a secret file that must not exist yet (mode 0600, never through a link); one that exists with
    other bytes is an error, never overwritten: it may be the only copy of a key."""
    if load_or_create_secret(path, lambda: data) != data:
        raise AuditError(f"{path}: exists and holds another key; move it aside (it may be the only copy of that "
                         "key) and run the command again")


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (a created key must survive a crash that follows)."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_secret(path: Path) -> bytes | None:
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
    nonce = os.urandom(12)
    sealed = AESGCM(_seal_key(audit_key)).encrypt(nonce, canonical_json(value), _SEAL_LABEL)
    return base64.b64encode(nonce + sealed).decode("ascii")


def unseal(audit_key: bytes, sealed: str) -> dict[str, Any]:
    """The sealed fields, or an AuditError if they were not sealed under this audit key or were changed."""
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


def id_digest(audit_key: bytes, sample_id: str) -> str:
    """HMAC-SHA256 hex of a sample ID: what the log stores instead of the ID."""
    # the one-shot C path: a forget digests every training and test ID to find forgotten ones that are back
    return hmac.digest(audit_key, sample_id.encode("utf-8"), "sha256").hex()


def forgotten_by(summaries: list[dict[str, Any]], audit_keys: Collection[bytes]
                 ) -> Callable[[Iterable[str]], dict[str, list[str]]]:
    """sample ids -> {id: the requests that forgot it}, each record matched under the audit key it names (a
    rotated log holds records keyed with several); records keyed with none of ``audit_keys`` match nothing."""
    by_id = {audit_key_id(key): key for key in audit_keys}
    owners: dict[str, dict[str, list[str]]] = {}  # audit key id -> HMAC -> requests, in record order
    for summary in summaries:
        for digest in summary["forgotten_ids"]:
            owners.setdefault(summary["audit_key_id"], {}).setdefault(digest, []).append(summary["request_id"])
    keyed = [(by_id[named], table) for named, table in owners.items() if named in by_id]

    def lookup(sample_ids: Iterable[str]) -> dict[str, list[str]]:
        found = {}
        for sample_id in sample_ids:
            requests = [r for key, table in keyed for r in table.get(id_digest(key, sample_id), [])]
            if requests:
                found[sample_id] = requests
        return found

    return lookup


def random_secret(path: Path, size: int, create: bool, value: bytes | None = None) -> bytes | None:
    """A secret of ``size`` random bytes (or ``value``, a copy of another's) kept at ``path`` (mode 0600): read,
    else created when ``create``, else None. Created the way the audit keys are (never through a link, never over
    an existing file)."""
    secret = (load_or_create_secret(path, lambda: os.urandom(size) if value is None else value) if create
              else read_secret(path))
    if secret is not None and len(secret) != size:
        raise AuditError(f"{path}: holds {len(secret)} bytes, not {size}; restore it from your backup")
    return secret
