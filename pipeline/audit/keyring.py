"""The audit's keys and the trust placed in them: where each lives, and why none of it is in the project's git.

An operator who can edit the repository must not be able to choose which signing key the log is checked
against, so the trusted fingerprints come from outside it, first source found wins:

1. ``--trusted-key KEY`` flags (an auditor's own choice: a fingerprint, or a PEM public key file);
2. ``LEGONET_TRUSTED_KEYS`` (fingerprints or PEM files, separated by commas or spaces);
3. ``<key dir>/trusted-keys`` (one fingerprint a line), written when the project's signing key is created.

The key dir holds the secrets, the pins and the last checkpoint the operator signed. It is outside the project
folder by default (``$XDG_DATA_HOME/legonet/keys/<project id>``, else ``~/.local/share/...``), so a tarball, an
rsync or a container build context of the project carries no key; ``LEGONET_KEY_DIR`` or ``audit.key_dir``
override it. A project made before that default keeps its keys in ``.legonet/keys`` (`legonet forget` and
`legonet audit verify` say so) until `legonet audit move-keys` moves them. ``key_dir`` is the one resolver of
that folder: every key file is found through it. The key dir must not be inside ``audit/`` or anywhere git
would commit.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.audit.envelope import key_id
from pipeline.audit.log import TRUSTED_KEYS_ENV, AuditLog
from pipeline.audit.secrets import audit_key_id, load_or_create_audit_key, load_or_create_signing_key, read_public_keys
from pipeline.data.dataset import write_bytes_atomic
from pipeline.errors import AuditError
from pipeline.project.layout import STATE_DIR
from pipeline.tracking.identity import project_id

AUDIT_DIR = Path("audit")
RECORDS = AUDIT_DIR / "records"
PUBLIC_KEY = AUDIT_DIR / "signing-key.pub"
KEY_DIR_ENV = "LEGONET_KEY_DIR"
IN_PROJECT = STATE_DIR / "keys"  # the key dir of projects made before the per-user default (and of copies)
TRUSTED_KEYS = "trusted-keys"
SIGNING_KEY = "signing.key"
AUDIT_KEY = "audit.key"
RETIRED = "retired"  # keys a rotation replaced: audit-<key id>.key (still checks its records), signing-<fp>.key
NEXT = ".next"  # suffix of the new key of a rotation in progress (it finishes the rotation when re-run)
CHECKPOINT = "checkpoint"
VERIFIED = "verified-log.json"  # AuditLog's memo of its last clean pass
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def key_dir(root: Path, params: dict[str, Any]) -> Path:
    """The folder of the audit secrets: ``LEGONET_KEY_DIR``, else ``audit.key_dir``, else a project's
    ``.legonet/keys`` that exists (a project made before the per-user default), else ``default_key_dir``.
    Refused inside ``audit/`` or anywhere in the project git would commit; inside the project folder, said once."""
    configured = os.environ.get(KEY_DIR_ENV) or params.get("audit", {}).get("key_dir")
    if configured:
        path = Path(configured).expanduser()
        path = path if path.is_absolute() else root / path
    elif (root / IN_PROJECT).is_dir():
        path = root / IN_PROJECT
    else:
        return default_key_dir(params)
    resolved, project = path.resolve(), root.resolve()
    if resolved.is_relative_to(project / AUDIT_DIR):
        raise AuditError(f"audit.key_dir {configured!r} is inside {AUDIT_DIR}/, which is committed to git: the "
                         "private keys would be published; use a folder outside the repository")
    if resolved.is_relative_to(project) and (root / ".git").exists() and subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", str(resolved / AUDIT_KEY)], cwd=root).returncode != 0:
        raise AuditError(f"audit.key_dir {configured!r} is inside the project and not ignored by git, so "
                         "`git add` would commit the private keys; use a folder outside it")
    return path


def default_key_dir(params: dict[str, Any]) -> Path:
    """The per-user key dir of a project, named by its ID (a path would change when the folder moves):
    ``$XDG_DATA_HOME/legonet/keys/<id>``, else ``~/.local/share/legonet/keys/<id>`` (XDG: a relative
    ``XDG_DATA_HOME`` is ignored)."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data_home) if Path(data_home).is_absolute() else Path.home() / ".local" / "share"
    return base / "legonet" / "keys" / project_id(params)


def in_project_note(root: Path, params: dict[str, Any]) -> str | None:
    """Why and how to move the keys, when the key dir is inside the project folder (a project made before the
    per-user default): a copy or an archive of the folder carries them."""
    path = key_dir(root, params)
    if not path.resolve().is_relative_to(root.resolve()):
        return None
    return (f"note: the audit keys are in {path}, inside the project folder, so a copy or an archive of the folder "
            "carries them; `legonet audit move-keys` moves them to the per-user key dir")


def trusted_fingerprints(root: Path, params: dict[str, Any], given: Sequence[str] = ()) -> frozenset[str]:
    """The signing-key fingerprints this reader trusts: flags, else the environment, else the key dir's file."""
    if given:
        return frozenset(f for item in given for f in _fingerprints(item, "--trusted-key"))
    if os.environ.get(TRUSTED_KEYS_ENV):
        items = re.split(r"[\s,]+", os.environ[TRUSTED_KEYS_ENV].strip())
        return frozenset(f for item in items if item for f in _fingerprints(item, TRUSTED_KEYS_ENV))
    path = key_dir(root, params) / TRUSTED_KEYS
    if not path.is_file():
        return frozenset()
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return frozenset(f for line in lines if line for f in _fingerprints(line, str(path)))


def _fingerprints(item: str, source: str) -> list[str]:
    """A fingerprint as given, or the fingerprints of the keys in a PEM file."""
    if _FINGERPRINT.fullmatch(item.lower()):
        return [item.lower()]
    if Path(item).is_file():
        return sorted(read_public_keys(Path(item)))
    raise AuditError(f"{source}: {item!r} is neither a 64-hex-digit key fingerprint nor a PEM public key file")


def audit_log(root: Path, params: dict[str, Any], trusted: Sequence[str] = (),
              checkpoints: Sequence[Path] = (), memo: bool = False, notes: Sequence[tuple[str, str]] = ()
              ) -> AuditLog:
    """The project's audit log, trusting the fingerprints from outside the repository (see module doc), and
    anchored to the checkpoint kept in the key dir and to any checkpoint files a reader kept.

    ``memo`` (the forget and its quality stage: the key holder's own reads) reuses the last clean pass kept in
    the key dir, so only records added since are verified; `legonet audit` commands verify every record.
    """
    keys = key_dir(root, params)
    anchors = [(f"{path}", _read_checkpoint(path)) for path in checkpoints] + list(notes)  # notes: (where, note)
    if (keys / CHECKPOINT).is_file():
        anchors.insert(0, ("the checkpoint kept in the key dir", _read_checkpoint(keys / CHECKPOINT)))
    return AuditLog(root / RECORDS, root / PUBLIC_KEY, trusted_fingerprints(root, params, trusted), anchors,
                    memo=keys / VERIFIED if memo else None)


def _read_checkpoint(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"{path}: cannot read the checkpoint ({exc})") from exc


def audit_key(root: Path, params: dict[str, Any], log: AuditLog) -> bytes:
    """The HMAC audit key in force. Created only for an empty log; must be the key the log says keys the next
    record (the first forget's, or the one the last audit-key rotation introduced)."""
    keys = key_dir(root, params)
    key = load_or_create_audit_key(keys / AUDIT_KEY, create=log.size() == 0)
    named = log.audit_key_ids()
    if named and audit_key_id(key) != named[-1]:
        fix = ("an audit-key rotation was interrupted: run `legonet audit rotate-key --hmac` again to finish it"
               if (keys / f"{AUDIT_KEY}{NEXT}").exists() else
               "restore the right key (`legonet audit restore-keys`): a different key cannot check the records")
        raise AuditError(f"the audit log's records are keyed with audit key {named[-1]}, but "
                         f"{keys / AUDIT_KEY} is key {audit_key_id(key)}; {fix}")
    return key


def audit_keys(root: Path, params: dict[str, Any], log: AuditLog) -> list[bytes]:
    """Every audit key the log names: the one in force and those retired by rotations (``retired/``), each
    checked against its id. A lost one is an error: the IDs its records forgot could no longer be recognised."""
    current = audit_key(root, params, log)
    keys = [current]
    for named in log.audit_key_ids()[:-1]:
        path = key_dir(root, params) / RETIRED / f"audit-{named}.key"
        key = load_or_create_audit_key(path, create=False)
        if audit_key_id(key) != named:
            raise AuditError(f"{path} is audit key {audit_key_id(key)}, not {named}; restore the right key "
                             "(`legonet audit restore-keys`)")
        keys.append(key)
    return keys


def signing_key(root: Path, params: dict[str, Any], log: AuditLog) -> Ed25519PrivateKey:
    """The Ed25519 signing key; created (and its fingerprint pinned in the key dir) only for an empty log."""
    keys = key_dir(root, params)
    if (keys / f"{SIGNING_KEY}{NEXT}").exists():
        raise AuditError(f"{keys / (SIGNING_KEY + NEXT)}: a signing-key rotation was interrupted; run `legonet "
                         "audit rotate-key --signing` again to finish it")
    empty = log.size() == 0
    key = load_or_create_signing_key(keys / SIGNING_KEY, create=empty)
    pins = keys / TRUSTED_KEYS
    if empty and not pins.exists():
        write_bytes_atomic(pins, f"{key_id(key.public_key())}  # legonet audit signing key\n".encode())
    return key


def pin(root: Path, params: dict[str, Any], fingerprint: str, note: str) -> None:
    """Add a fingerprint to the key dir's trusted-keys file (after a rotation), once."""
    path = key_dir(root, params) / TRUSTED_KEYS
    existing = path.read_text() if path.exists() else ""
    if fingerprint in {line.split("#")[0].strip() for line in existing.splitlines()}:
        return
    write_bytes_atomic(path, f"{existing}{fingerprint}  # {note}\n".encode())


def origin(log: AuditLog, audit_key: bytes) -> str:
    """The checkpoint origin (the log's name): fixed for a project's life by its first audit key (an audit-key
    rotation does not rename the log a kept checkpoint names)."""
    return f"legonet.local/audit/{next(iter(log.audit_key_ids()), audit_key_id(audit_key))}"


def anchor(root: Path, params: dict[str, Any], note: str) -> None:
    """Keep the newest signed checkpoint beside the keys: `audit verify` proves the log still extends it."""
    write_bytes_atomic(key_dir(root, params) / CHECKPOINT, note.encode("utf-8"))


