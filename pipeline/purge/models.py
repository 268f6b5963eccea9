"""Purge of MLflow models: the model versions and logged models of this project trained on forgotten samples.

Scoped by the project's ID (``pipeline.tracking.identity``): only objects carrying it are listed, deleted and
hard-deleted (MLflow's gc is given exactly their IDs), on a server other projects share. In two steps, so that a
crash anywhere is finished by a re-run: ``plan_purge`` lists the objects (the forget's journal keeps the list),
``purge_models`` deletes each one still there and checks none is left. ``mlflow gc`` silently skips artifacts it
cannot resolve and, through a server's proxy, deletes only the current version of an object in a versioned bucket,
so the artifacts are checked and purged here too.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.purge.s3 import artifact_bucket
from pipeline.tracking.identity import PROJECT_TAG, logged_model_of, pages, project_experiments


def purge_artifact_store(destination: str, doomed: set[str]) -> dict[str, Any]:
    """Delete from the MLflow artifact bucket every object (every version) of the purged logged models ``doomed``.

    Keys look like ``<prefix>/<experiment id>/models/<model id>/artifacts/...``. ``mlflow gc`` through a server
    deletes the current objects only, so old versions and delete markers in a versioned bucket are found here. Only
    the purged models' keys are touched: the bucket is shared with every other project on the server.
    """
    def dead(rel: str) -> bool:
        parts = rel.split("/")
        return len(parts) > 3 and parts[1] == "models" and parts[2] in doomed

    return artifact_bucket(destination).purge(dead)


def preload() -> None:
    """Import MLflow's gc, which ``purge_models`` runs in its process (a forget's stage worker calls this while the
    forget plans and retrains, so the purge step does not wait for the import)."""
    import mlflow.cli  # noqa: F401

    zero_deleted_sqlite_rows()


def zero_deleted_sqlite_rows() -> None:
    """Have every SQLite connection this process's SQLAlchemy pools hand out overwrite deleted content with zeros
    (``PRAGMA secure_delete``), so the rows a purge deletes through MLflow leave no bytes in free pages or inside
    pages. A ``VACUUM`` would do it by rewriting the whole store, which grows with every forget's lineage runs.
    Set on checkout, not on connect, so that connections MLflow opened before this call are covered too."""
    # lazy: SQLAlchemy imported only where needed (seconds), not by every command and stage
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if not event.contains(Pool, "checkout", _secure_delete):
        event.listen(Pool, "checkout", _secure_delete)


def _secure_delete(connection: Any, record: Any, proxy: Any) -> None:
    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA secure_delete = ON")


CRASH_ENV = "LEGONET_CRASH_AFTER"  # fault injection, as in pipeline.forget.flow, at the purge's own steps
CRASH_POINTS = ("mlflow-version-deleted", "mlflow-before-gc", "mlflow-after-gc")
PURGE_AFTER_TAG = "legonet.purge_after"


def plan_purge(tracking_uri: str, name: str, pid: str, keep_version: str | None, retain_until: str | None
               ) -> dict[str, Any]:
    """The MLflow objects of project ``pid`` a forget deletes, listed before any is deleted (the forget's journal
    keeps the list, so a re-run after a crash deletes what is left of the same objects).

    Every version of the project (any registered model name it used, every page) except ``keep_version`` of
    ``name`` was trained on data that held the forgotten samples (data only ever shrinks by forgetting), so all are
    residue, each with its logged model; so is every logged model of the project no live version serves (one whose
    version an earlier, interrupted purge deleted). With ``retain_until`` (an ISO date, from
    ``purge.retention_days``) superseded versions are kept until then; a version tagged ``legonet.purge_after`` by
    an earlier forget is kept until its own date. Objects without the project's ID are never listed.
    """
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    today = datetime.now(UTC).date().isoformat()
    delete, retain, live = [], [], set()
    for version in sorted(project_versions(client, pid), key=lambda v: (v.name, int(v.version))):
        number, model_id = str(version.version), logged_model_of(version)  # the store may give ints
        due = version.tags.get(PURGE_AFTER_TAG) or retain_until
        kept = (version.name, number) == (name, str(keep_version))
        if kept or (due is not None and due > today):
            live.add(model_id)
            if not kept:
                retain.append({"name": version.name, "version": number, "until": due})
            continue
        delete.append({"name": version.name, "version": number, "model_id": model_id,
                       "run_id": version.tags.get("package_run_id") or version.run_id})
    planned = {item["model_id"] for item in delete}
    orphans = sorted(m.model_id for m in project_logged_models(client, pid) if m.model_id not in live | planned)
    return {"project_id": pid, "registered_model": name, "delete": delete, "orphan_logged_models": orphans,
            "retain": retain}


def purge_models(tracking_uri: str, plan: dict[str, Any], request_ids: list[str], artifact_root: Path,
                 backend_store_uri: str = "", artifacts_destination: str = "") -> dict[str, Any]:
    """Delete what ``plan_purge`` listed, hard-delete the logged models, and check that none is left.

    Every step is idempotent (an object already gone is skipped), so a run after a crash at any point finishes the
    same list. Run metadata that holds only digests stays, tagged as superseded. With ``artifacts_destination``
    (the server's S3 ``--artifacts-destination``) every object version of the purged logged models is deleted from
    the bucket too. Returns what the audit record says: the IDs purged (every planned one, whichever attempt
    deleted it).
    """
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient

    zero_deleted_sqlite_rows()
    client = MlflowClient(tracking_uri)
    for item in plan["delete"]:
        if item["run_id"]:
            _unless_gone(client.set_tag, item["run_id"], "legonet.superseded_by", ",".join(request_ids))
        _unless_gone(client.delete_model_version, item["name"], item["version"])
        crash_point("mlflow-version-deleted")
        if item["model_id"]:
            _unless_gone(client.delete_logged_model, item["model_id"])
    for model_id in plan["orphan_logged_models"]:
        _unless_gone(client.delete_logged_model, model_id)
    for item in plan["retain"]:
        _unless_gone(client.set_model_version_tag, item["name"], item["version"], PURGE_AFTER_TAG, item["until"])
    doomed = sorted({item["model_id"] for item in plan["delete"] if item["model_id"]}
                    | set(plan["orphan_logged_models"]))
    crash_point("mlflow-before-gc")
    hard_delete_logged_models(tracking_uri, backend_store_uri or tracking_uri, doomed)
    crash_point("mlflow-after-gc")
    leftovers = []
    for model_id in doomed:  # gc deletes the artifacts, not their folder; files left mean it could not resolve them
        folder = artifact_root / model_id
        if folder.is_dir():
            if any(path.is_file() for path in folder.rglob("*")):
                leftovers.append(model_id)
            shutil.rmtree(folder)
    store = purge_artifact_store(artifacts_destination, set(doomed)) if artifacts_destination else None
    remaining = still_present(client, plan)
    if remaining:
        raise StoreError(f"MLflow still holds {', '.join(remaining)} after the purge")
    name = plan["registered_model"]
    return {"project_id": plan["project_id"], "registered_model": name,
            "deleted_model_versions": [_label(item, name) for item in sorted(
                plan["delete"], key=lambda item: (item["name"] != name, item["name"], int(item["version"])))],
            "deleted_logged_models": doomed, "removed_after_gc_skipped": leftovers,
            "retained_model_versions": {_label(item, name): item["until"] for item in plan["retain"]},
            **({"artifact_store": store} if store else {})}


def crash_point(name: str) -> None:
    """Fault injection (tests): with ``LEGONET_CRASH_AFTER=name``, SIGKILL the forget here, as a power cut would;
    in a forget's stage worker, the forget process that started it first."""
    if os.environ.get(CRASH_ENV) != name:
        return
    parent = multiprocessing.parent_process()
    if parent is not None:
        os.kill(parent.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def hard_delete_logged_models(tracking_uri: str, backend_store_uri: str, model_ids: list[str]) -> None:
    """MLflow's gc for exactly these logged models (deleted, their artifacts too), and nothing else.

    ``mlflow gc --logged-model-ids`` alone also hard-deletes every deleted run and every deleted experiment of the
    whole store (its ``--run-ids`` and ``--experiment-ids`` default to all): on a shared server, other teams' trash.
    Its core is called instead with no runs and experiments skipped. It runs in this process: a child process would
    import MLflow and open the store again (~3 s). With an `mlflow server`, gc needs its backend store (the
    database) and resolves artifacts through the tracking URI.
    """
    if not model_ids:
        return
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow.cli import _gc_tracking_resources
    from mlflow.tracking import _get_store, set_tracking_uri

    set_tracking_uri(tracking_uri)
    try:
        _gc_tracking_resources(_get_store(backend_store_uri), run_ids=[], experiment_ids=None,
                               logged_model_ids=model_ids, older_than=None, time_delta=0, skip_experiments=True,
                               skip_logged_models=False, ignore_not_found=True)
    except Exception as exc:  # MLflow raises its own kinds; the purge stays pending (pipeline.purge.pending)
        raise StoreError(f"mlflow gc of logged models {', '.join(model_ids)} failed: {exc}") from exc


def still_present(client: Any, plan: dict[str, Any]) -> list[str]:
    """The planned versions and logged models MLflow still returns."""
    left = [f"model version {item['version']} of {item['name']!r}" for item in plan["delete"]
            if _exists(client.get_model_version, item["name"], item["version"])]
    models = {item["model_id"] for item in plan["delete"] if item["model_id"]} | set(plan["orphan_logged_models"])
    return left + [f"logged model {m}" for m in sorted(models) if _exists(client.get_logged_model, m)]


def project_versions(client: Any, pid: str) -> list[Any]:
    """Every model version carrying the project's ID, of any registered model, through every page."""
    return list(pages(lambda token: client.search_model_versions(f"tags.`{PROJECT_TAG}` = '{pid}'",
                                                                 page_token=token)))


def project_logged_models(client: Any, pid: str) -> list[Any]:
    """Every active logged model carrying the project's ID, in the project's experiments, through every page (one
    call returns at most 100)."""
    experiments = project_experiments(client, pid)
    if not experiments:
        return []
    return list(pages(lambda token: client.search_logged_models(
        experiment_ids=experiments, filter_string=f"tags.`{PROJECT_TAG}` = '{pid}'", page_token=token)))


def residue(tracking_uri: str, pid: str, name: str, records: list[dict[str, Any]], artifact_root: Path
            ) -> list[str]:
    """What `legonet audit verify` finds of this project's MLflow objects trained on forgotten data (one line each):

    * a model version or logged model an audit record lists as purged that MLflow still returns (or whose artifact
      folder is still in the project);
    * a version of the project registered before the newest forget's version (so trained on data that held its
      samples) that is neither gone nor kept by ``purge.retention_days`` (tag ``legonet.purge_after`` in the
      future), and a logged model of the project from before it that no such version serves.
    """
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    problems = []
    for record in records:
        purged = record["predicate"].get("purge", {}).get("mlflow") or {}
        model = purged.get("registered_model", name)
        request = record["predicate"]["request_id"]
        for label in purged.get("deleted_model_versions", []):
            owner, _, number = label.rpartition("/") if "/" in label else (model, "", label)
            if _exists(client.get_model_version, owner, number):
                problems.append(f"MLflow: model version {number} of {owner!r}, purged by request {request}, exists")
        for model_id in purged.get("deleted_logged_models", []):
            if _exists(client.get_logged_model, model_id) or (artifact_root / model_id).exists():
                problems.append(f"MLflow: logged model {model_id}, purged by request {request}, still exists")
    newest = next((r["predicate"]["registry"]["model_version"] for r in reversed(records)
                   if r["predicate"].get("registry", {}).get("model_version")), None)
    if newest is None or not _exists(client.get_model_version, name, newest):
        return problems
    since = client.get_model_version(name, newest).creation_timestamp
    today = datetime.now(UTC).date().isoformat()
    served = set()
    for version in project_versions(client, pid):
        served.add(logged_model_of(version))
        due = version.tags.get(PURGE_AFTER_TAG)
        if version.creation_timestamp < since and not (due and due > today):  # older: trained on forgotten data
            kept = f" (kept until {due}, now past)" if due else ""
            problems.append(f"MLflow: model version {version.version} of {version.name!r} was trained before the "
                            f"last forget's version {newest} and is not purged{kept}; run `legonet forget` again")
    for logged in project_logged_models(client, pid):
        if logged.model_id not in served and logged.creation_timestamp < since:
            problems.append(f"MLflow: logged model {logged.model_id} of this project, from before the last forget's "
                            f"version {newest}, serves no version and is not purged")
    return problems


def _label(item: dict[str, Any], name: str) -> str:
    """A version as the record names it: its number in the project's registered model, else ``name/number``."""
    return item["version"] if item["name"] == name else f"{item['name']}/{item['version']}"


def _unless_gone(call: Any, *args: Any) -> None:
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow.exceptions import MlflowException

    try:
        call(*args)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _exists(call: Any, *args: Any) -> bool:
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow.exceptions import MlflowException

    try:
        call(*args)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def vacuum_sqlite(tracking_uri: str) -> None:
    """Compact a SQLite store that an `mlflow server` deleted rows from: its connections do not zero deleted
    content (``zero_deleted_sqlite_rows`` covers this process's only), so they could linger in free pages."""
    if tracking_uri.startswith("sqlite:///"):
        with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as db:
            db.execute("VACUUM")
