"""The operator's key work (`legonet audit rotate-key`, `backup-keys`, `restore-keys`, `move-keys`).

A rotation is itself a signed record, so a reader of the log learns which key signs, and which audit key keys,
each record; the keys it replaces are kept (``retired/`` in the key dir), because the records they keyed must
stay checkable. A rotation writes its new key beside the current one first (``*.next``), then appends the
record, then swaps the files: re-running an interrupted rotation finishes it, and no step loses a key.

Only the signing key and the audit (HMAC) key are rotated; every other file in the key dir (the pins, the kept
checkpoint, secrets other parts of legonet keep there) is left as it is, but for the new fingerprint added to
the pins. A backup holds every file of the key dir.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.audit.envelope import key_id
from pipeline.audit.keyring import (
    AUDIT_KEY,
    CHECKPOINT,
    KEY_DIR_ENV,
    NEXT,
    RETIRED,
    SIGNING_KEY,
    TRUSTED_KEYS,
    VERIFIED,
    anchor,
    audit_key,
    audit_log,
    default_key_dir,
    key_dir,
    origin,
    pin,
    signing_key,
)
from pipeline.audit.log import AuditLog
from pipeline.audit.secrets import (
    audit_key_id,
    keep_secret,
    load_or_create_audit_key,
    load_or_create_signing_key,
    read_secret,
)
from pipeline.errors import AuditError
from pipeline.project.init import set_params
from pipeline.project.params import PARAMS
from pipeline.runner.build import commit_project
from pipeline.tracking.identity import project_id

BACKUP_FORMAT = "https://legonet.dev/key-backup/v1"
LOSS = ("What a lost key means: without the audit (HMAC) key, or a retired one, no forget can check an ID against "
        "the records it keyed, so every forget stops (exit 9) until it is restored; without the signing key no "
        "record can be added: restore it, or, if it is gone for good, start a new pinned key with the auditors "
        "(a new key can only be introduced by a record the old one signs, so rotate while you still hold it); "
        "without the project's data secret every artifact digest changes on the next build. Keep the backup "
        "offline, readable by you only.")


def rotate(root: Path, params: dict[str, Any], signing: bool, hmac: bool, say: Callable[[str], None]) -> None:
    """Rotate the signing key and/or the audit key of a project whose log verifies, then sign a new checkpoint
    with the key now in force and commit the records."""
    log = audit_log(root, params)
    if not log.audit_key_ids():  # verifies the whole log first
        raise AuditError("the audit log holds no forget record yet: the keys are made by the first forget, and "
                         "there is nothing to rotate")
    if signing:
        say(f"signing key rotated: records from now on are signed by {_rotate_signing(root, params, log)[:16]}")
    if hmac:
        say(f"audit key rotated: records from now on are keyed with {_rotate_audit_key(root, params, log)}")
    log = audit_log(root, params)
    note = log.checkpoint(origin(log, audit_key(root, params, log)), signing_key(root, params, log))
    anchor(root, params, note)
    commit_project(root, f"legonet audit rotate-key{' --signing' if signing else ''}{' --hmac' if hmac else ''}")
    say(f"audit checkpoint (keep it):\n{note}")


def _rotate_signing(root: Path, params: dict[str, Any], log: AuditLog) -> str:
    keys = key_dir(root, params)
    new = load_or_create_signing_key(keys / f"{SIGNING_KEY}{NEXT}")  # a crashed attempt's key, else a new one
    new_id = key_id(new.public_key())
    old = load_or_create_signing_key(keys / SIGNING_KEY, create=False)
    if new_id not in log.active_keys():
        log.rotate(old, new.public_key())
    pin(root, params, new_id, f"legonet audit signing key since {datetime.now(UTC).date().isoformat()}")
    if key_id(old.public_key()) != new_id:
        _retire(keys / SIGNING_KEY, keys / RETIRED / f"signing-{key_id(old.public_key())}.key")
    os.replace(keys / f"{SIGNING_KEY}{NEXT}", keys / SIGNING_KEY)
    return new_id


def _rotate_audit_key(root: Path, params: dict[str, Any], log: AuditLog) -> str:
    keys = key_dir(root, params)
    new = load_or_create_audit_key(keys / f"{AUDIT_KEY}{NEXT}")
    if log.audit_key_ids()[-1] != audit_key_id(new):
        current = audit_key(root, params, log)
        _retire(keys / AUDIT_KEY, keys / RETIRED / f"audit-{audit_key_id(current)}.key")  # before the record
        log.rotate_audit_key(current, new, signing_key(root, params, log))
    os.replace(keys / f"{AUDIT_KEY}{NEXT}", keys / AUDIT_KEY)
    return audit_key_id(new)


def _retire(current: Path, kept: Path) -> None:
    """Keep a copy of a key a rotation replaces (never overwriting another key kept under that name)."""
    data = read_secret(current)
    if data is None:
        raise AuditError(f"{current}: missing; restore it before rotating (`legonet audit restore-keys`)")
    keep_secret(kept, data)


def backup(root: Path, params: dict[str, Any], dest: Path) -> int:
    """Write every file of the key dir to ``dest`` (one JSON file, mode 0600); refuses to replace a file."""
    keys = key_dir(root, params)
    files = _files(keys)
    if not files:
        raise AuditError(f"{keys}: holds no key yet (the first forget makes them); nothing to back up")
    if dest.exists() or dest.is_symlink():
        raise AuditError(f"{dest}: exists; choose a new file name (a backup never replaces a file)")
    document = {"format": BACKUP_FORMAT, "project_id": project_id(params),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": {name: base64.b64encode(data).decode("ascii") for name, data in sorted(files.items())}}
    keep_secret(dest, json.dumps(document, indent=1, sort_keys=True).encode("utf-8") + b"\n")
    return len(files)


def restore(root: Path, params: dict[str, Any], src: Path) -> tuple[list[str], list[str]]:
    """Put the files of a backup that are missing into the key dir; return those restored, and the public files
    kept as they are (the pins and the kept checkpoint, which later rotations and forgets advance past the
    backup's). Checks everything first: a key file that exists with other bytes refuses the whole restore
    (nothing is written), since it may be the only copy of a key."""
    data = read_secret(src)
    if data is None:
        raise AuditError(f"{src}: no such backup file")
    try:
        document = json.loads(data)
        files = {str(name): base64.b64decode(value, validate=True) for name, value in document["files"].items()}
        format_, project = document["format"], document["project_id"]
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, RecursionError) as exc:
        raise AuditError(f"{src}: not a legonet key backup ({type(exc).__name__}: {str(exc)[:200]})") from None
    if format_ != BACKUP_FORMAT:
        raise AuditError(f"{src}: format {format_!r} is not {BACKUP_FORMAT}")
    if project != project_id(params):
        raise AuditError(f"{src}: a backup of project {project}, but this is project {project_id(params)}")
    keys = key_dir(root, params)
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts or not name:
            raise AuditError(f"{src}: file name {name!r} is not inside the key dir")
    differ = sorted(name for name, content in files.items() if _read(keys / name) not in (None, content))
    clashes = [name for name in differ if name not in (TRUSTED_KEYS, CHECKPOINT)]
    if clashes:
        raise AuditError(f"{keys}: {', '.join(sorted(clashes))} exist with other bytes than the backup's; nothing "
                         "was restored (move them aside first if the backup's are the ones to keep)")
    restored = [name for name in sorted(files) if _read(keys / name) is None]
    for name in restored:
        (keys / name).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        keep_secret(keys / name, files[name])
    return restored, [name for name in differ if name not in clashes]


def move(root: Path, params: dict[str, Any]) -> Path:
    """Move a project's keys out of its folder (``.legonet/keys``, where projects made before the per-user
    default keep them, named by ``audit.key_dir`` or found there) to the per-user key dir; ``audit.key_dir`` is
    reset in params.yaml. Everything is copied and checked before the old folder is removed."""
    source = key_dir(root, params)
    if not source.resolve().is_relative_to(root.resolve()):
        raise AuditError(f"the audit keys are in {source}, already outside the project folder")
    if os.environ.get(KEY_DIR_ENV):
        raise AuditError(f"{KEY_DIR_ENV} names {source}, inside the project folder: point it elsewhere and move "
                         "the files there yourself")
    files = _files(source)
    hidden = source.with_name(f".{source.name}-moving")
    os.rename(source, hidden)  # the resolver now looks past it
    try:
        target = default_key_dir(params)
        for name, content in sorted(files.items()):
            (target / name).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            keep_secret(target / name, content)
        if params.get("audit", {}).get("key_dir"):
            set_params(root / PARAMS, {"audit.key_dir": None})
    except BaseException:
        os.rename(hidden, source)
        raise
    commit_project(root, "legonet audit move-keys: the audit keys are outside the project folder")
    shutil.rmtree(hidden)
    return target


def _files(folder: Path) -> dict[str, bytes]:
    """The key dir's files by relative name: all but the memo of the last verified pass (rebuilt by the next
    one) and temporary files of a write in progress."""
    found = {}
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        name = path.relative_to(folder).as_posix()
        if not path.is_dir() and name != VERIFIED and ".tmp-" not in path.name and (data := _read(path)) is not None:
            found[name] = data
    return found


def _read(path: Path) -> bytes | None:
    """A key dir file's bytes (None: absent). Key files are read as secrets (mode 0600, no link); the pins and
    the checkpoint are public, but never read through a link either."""
    if path.suffix in (".key", NEXT):
        return read_secret(path)
    if path.is_symlink():
        raise AuditError(f"{path}: a symbolic link in the key dir; replace it with the file it points at")
    return path.read_bytes() if path.is_file() else None
