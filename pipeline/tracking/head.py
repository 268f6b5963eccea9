"""The audit head a project's registry holds, so that two clones of one project cannot fork its audit log.

Clones of a project share its MLflow store and its DVC remotes, but each has its own git work tree and audit log.
If one clone forgot a request that another has not pulled, a forget in the other would append a second record with
the same sequence number (a forked log) and rebuild and purge from an outdated view of the data, and its build
would register a model trained on samples already forgotten. So every forget leaves its signed checkpoint on the
registered model (tag ``legonet.audit_head``), and `legonet forget` and `legonet build` refuse to start unless the
local log extends the checkpoint the registry holds (docs/design.md section 9). The supported topology is one
writer at a time: another clone pulls (git, then `dvc pull`) before it forgets or builds.

The tag is read without importing MLflow (seconds, on a path that must stay fast): a SQLite store by file, an
`mlflow server` over its REST API with the credentials MLflow's own client reads from the environment.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

from pipeline.audit.keyring import audit_log
from pipeline.errors import ForgetError, StoreError

HEAD_TAG = "legonet.audit_head"


def registry_head(settings: dict[str, Any]) -> str | None:
    """The checkpoint note the registered model carries, or None (no model, no tag, or a store not read here)."""
    uri, name = str(settings["tracking_uri"]), str(settings["registered_model"])
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return None
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            try:
                row = db.execute("SELECT value FROM registered_model_tags WHERE name = ? AND key = ?",
                                 (name, HEAD_TAG)).fetchone()
            except sqlite3.OperationalError:  # a store whose registry tables do not exist yet
                return None
        return row[0] if row else None
    if uri.startswith(("http://", "https://")):
        return _server_head(uri.rstrip("/"), name)
    return None


def _server_head(uri: str, name: str) -> str | None:
    url = f"{uri}/api/2.0/mlflow/registered-models/get?{urllib.parse.urlencode({'name': name})}"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            model = json.loads(response.read()).get("registered_model", {})
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # no such registered model yet
            return None
        raise StoreError(f"MLflow server {uri}: reading the registered model {name!r} failed ({exc.code}); "
                         "check the server and its credentials") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"MLflow server {uri} unreachable: {exc}; retry when it answers") from None
    return next((tag.get("value") for tag in model.get("tags", []) if tag.get("key") == HEAD_TAG), None)


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
    where = "the registry's audit head"
    log = audit_log(root, params, memo=True, notes=[(where, note)])  # the key holder's read: only new records
    problems = [p.removeprefix(f"{where}: ") for p in log.verify() if p.startswith(where)]
    if problems:
        size = note.split("\n")[1] if note.count("\n") > 1 else "?"
        raise ForgetError(f"the registry's audit head (a checkpoint of {size} record(s), left by the newest forget "
                          f"on the shared store) is not a state of this clone's audit log: another clone of this "
                          f"project forgot since this one last pulled ({problems[0]}); "
                          "`git pull` the project and `dvc pull`, then run the command again")
