"""The audit head a project's registry holds, so that two clones of one project cannot fork its audit log.

Clones of a project share its MLflow store and its DVC remotes, but each has its own git work tree and audit log.
If one clone forgot a request that another has not pulled, a forget in the other would append a second record with
the same sequence number (a forked log) and rebuild and purge from an outdated view of the data, and its build
would register a model trained on samples already forgotten. So every forget leaves its signed checkpoint on the
registered model (tag ``legonet.audit_head``), and `legonet forget` and `legonet build` refuse to start unless the
local log extends the checkpoint the registry holds (docs/design.md section 9). The supported topology is one
writer at a time: another clone pulls (git, then `dvc pull`) before it forgets or builds. Two clones that start a
forget at the same moment both extend the head; so a forget also holds a lease on the shared registered model (tag
``legonet.writer_lease``) from its start to its commit, and a forget in another clone refuses while it is held.

The tags are read and written without importing MLflow (seconds, on a path that must stay fast): a SQLite store by
file, an `mlflow server` over its REST API with the credentials MLflow's own client reads from the environment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.audit.keyring import audit_log
from pipeline.errors import ForgetError, LockBusy, StoreError
from pipeline.project.layout import STATE_DIR
from pipeline.project.scratch import write_private

HEAD_TAG = "legonet.audit_head"
LEASE_TAG = "legonet.writer_lease"
CLONE_ID = STATE_DIR / "clone-id"
LEASE_HOURS = 6  # a forget or build that died keeps its lease this long, unless its own clone runs it again
SETTLE_SECONDS = 1.0  # an `mlflow server` has no compare-and-set: write, let a concurrent writer land, read back


def registry_head(settings: dict[str, Any], key: str = HEAD_TAG) -> str | None:
    """The checkpoint note the registered model carries (or its tag ``key``), or None (no model, no tag, or a store
    not read here)."""
    uri, name = str(settings["tracking_uri"]), str(settings["registered_model"])
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return None
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            try:
                row = db.execute("SELECT value FROM registered_model_tags WHERE name = ? AND key = ?",
                                 (name, key)).fetchone()
            except sqlite3.OperationalError:  # a store whose registry tables do not exist yet
                return None
        return row[0] if row else None
    if uri.startswith(("http://", "https://")):
        return _server_head(uri.rstrip("/"), name, key)
    return None


def registry_lease(settings: dict[str, Any]) -> str | None:
    """The writer lease the registered model carries (JSON: clone, host, pid, since, expires), or None."""
    return registry_head(settings, LEASE_TAG)


def _server_head(uri: str, name: str, key: str = HEAD_TAG) -> str | None:
    model = server_call(uri, "GET", f"get?{urllib.parse.urlencode({'name': name})}", None, name)
    if model is None:  # no such registered model yet
        return None
    tags = model.get("registered_model", {}).get("tags", [])
    return next((tag.get("value") for tag in tags if tag.get("key") == key), None)


def server_call(uri: str, method: str, path: str, body: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """One call of MLflow's REST API for registered models (``path`` below ``/api/2.0/mlflow/``: without a
    folder, ``registered-models/``); None when the model does not exist."""
    data = None if body is None else json.dumps(body).encode()
    path = path if "/" in path.split("?")[0] else f"registered-models/{path}"
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **_auth_headers()})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise StoreError(f"MLflow server {uri}: {method} registered model {name!r} failed ({exc.code}); "
                         "check the server and its credentials") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"MLflow server {uri} unreachable: {exc}; retry when it answers") from None


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's REST client sends: ``MLFLOW_TRACKING_TOKEN``, else username and password."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def check_head(root: Path, params: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse (ForgetError) unless this clone's audit log extends the checkpoint the registry holds.

    The note is checked as any kept checkpoint is (signed by a trusted key, and the log extends it), so a tag
    nobody trusted could have signed is refused too, never obeyed.
    """
    note = registry_head(settings)
    if note is None:
        return
    audit_log(root, params, memo=True).summaries()  # a log that does not verify is an AuditError, as ever
    where = "the registry's audit head"
    log = audit_log(root, params, memo=True, notes=[(where, note)])  # the key holder's read: only new records
    problems = [p.removeprefix(f"{where}: ") for p in log.verify() if p.startswith(where)]
    if problems:
        size = note.split("\n")[1] if note.count("\n") > 1 else "?"
        raise ForgetError(f"the registry's audit head (a checkpoint of {size} record(s), left by the newest forget "
                          f"on the shared store) is not a state of this clone's audit log: another clone of this "
                          f"project forgot since this one last pulled ({problems[0]}); "
                          "`git pull` the project and `dvc pull`, then run the command again")


def clone_id(root: Path) -> str:
    """This clone's ID: a random value kept in ``.legonet/clone-id`` (never in git), with the host and the folder,
    so that a copy of the folder elsewhere is another clone too."""
    path = root / CLONE_ID
    if not path.is_file():
        write_private(path, os.urandom(16).hex().encode())
    where = f"{path.read_text().strip()}:{socket.gethostname()}:{root.resolve()}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


@contextmanager
def writer_lease(root: Path, settings: dict[str, Any]) -> Iterator[None]:
    """Hold the shared registry's writer lease while the block runs; LockBusy if another clone holds it.

    Taken on a SQLite store in one transaction, on an `mlflow server` by write, wait, read back (the last writer
    holds it, the others refuse). A store with no registered model yet, or of another kind, has nothing to fork.
    """
    uri, name = str(settings["tracking_uri"]), str(settings["registered_model"])
    me, now = clone_id(root), datetime.now(UTC)
    lease = json.dumps({"clone": me, "host": socket.gethostname(), "pid": os.getpid(),
                        "since": now.isoformat(timespec="seconds"),
                        "expires": (now + timedelta(hours=LEASE_HOURS)).isoformat(timespec="seconds")})
    if uri.startswith("sqlite:///"):
        held = _sqlite_lease(Path(uri.removeprefix("sqlite:///")), name, me, lease)
    elif uri.startswith(("http://", "https://")):
        held = _server_lease(uri.rstrip("/"), name, me, lease)
    else:
        held = False
    try:
        yield
    finally:
        if held:
            _release(uri, name, me)


def check_lease(root: Path, settings: dict[str, Any]) -> None:
    """LockBusy at once while another clone holds a live lease: a command checks this before it reads or writes
    anything (the lease itself is taken at its first write, ``writer_lease``, which refuses again if another clone
    took it meanwhile)."""
    _refuse(registry_lease(settings), clone_id(root))


def _refuse(current: str | None, me: str) -> None:
    """LockBusy unless the lease ``current`` is free: none, expired, or this clone's (a forget it runs again)."""
    if current is None:
        return
    try:
        holder = json.loads(current)
        expires = datetime.fromisoformat(holder["expires"])
    except (ValueError, KeyError, TypeError):
        return  # not a lease legonet wrote: overwritten
    if holder.get("clone") == me or expires <= datetime.now(UTC):
        return
    raise LockBusy(f"another clone of this project is forgetting or building against the shared registry (host "
                   f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}); wait for it to "
                   f"finish, then `git pull` the project and `dvc pull`, and run the command again (a command that "
                   f"died keeps the lease until {holder['expires']}, unless re-run in its own clone)")


def _sqlite_lease(path: Path, name: str, me: str, lease: str) -> bool:
    if not path.is_file():
        return False
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")  # one writer from here to COMMIT: read and write as one step
        try:
            if db.execute("SELECT 1 FROM registered_models WHERE name = ?", (name,)).fetchone() is None:
                db.execute("ROLLBACK")
                return False
            row = db.execute("SELECT value FROM registered_model_tags WHERE name = ? AND key = ?",
                             (name, LEASE_TAG)).fetchone()
            _refuse(row[0] if row else None, me)
            db.execute("INSERT OR REPLACE INTO registered_model_tags (key, value, name) VALUES (?, ?, ?)",
                       (LEASE_TAG, lease, name))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return True


def _server_lease(uri: str, name: str, me: str, lease: str) -> bool:
    model = server_call(uri, "GET", f"get?{urllib.parse.urlencode({'name': name})}", None, name)
    if model is None:
        return False
    _refuse(_server_head(uri, name, LEASE_TAG), me)
    try:
        server_call(uri, "POST", "set-tag", {"name": name, "key": LEASE_TAG, "value": lease}, name)
    except StoreError:  # a server may reject one of two writes of the same tag at once: the other clone's
        time.sleep(SETTLE_SECONDS)
        _refuse(_server_head(uri, name, LEASE_TAG), me)
        raise
    time.sleep(SETTLE_SECONDS)
    _refuse(_server_head(uri, name, LEASE_TAG), me)  # a clone that wrote after this one holds it
    return True


def _release(uri: str, name: str, me: str) -> None:
    """Drop the lease if this clone still holds it (never another clone's, taken after this one's expired)."""
    if uri.startswith("sqlite:///"):
        with closing(sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=30, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT value FROM registered_model_tags WHERE name = ? AND key = ?",
                             (name, LEASE_TAG)).fetchone()
            if row and _holder(row[0]) == me:
                db.execute("DELETE FROM registered_model_tags WHERE name = ? AND key = ?", (name, LEASE_TAG))
            db.execute("COMMIT")
        return
    current = _server_head(uri, name, LEASE_TAG)
    if current and _holder(current) == me:
        server_call(uri, "DELETE", "delete-tag", {"name": name, "key": LEASE_TAG}, name)


def _holder(lease: str) -> str | None:
    try:
        return json.loads(lease).get("clone")
    except (ValueError, AttributeError):
        return None
