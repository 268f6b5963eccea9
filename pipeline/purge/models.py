"""Purge of MLflow models: delete the model versions and logged models trained on forgotten samples, then gc.

``mlflow gc`` silently skips artifacts it cannot resolve and, through a server's proxy, deletes only the
current version of an object in a versioned bucket, so the artifacts are checked and purged here too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.purge.s3 import artifact_bucket


def purge_artifact_store(destination: str, live: set[str]) -> dict[str, Any]:
    """Delete from the MLflow artifact bucket every object (every version) of a logged model that is not live.

    Keys look like ``<prefix>/<experiment id>/models/<model id>/artifacts/...``. ``mlflow gc`` through a server
    deletes the current objects only, so old versions and delete markers in a versioned bucket are found here.
    """
    def dead(rel: str) -> bool:
        parts = rel.split("/")
        return len(parts) > 3 and parts[1] == "models" and parts[2].startswith("m-") and parts[2] not in live

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
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    if not event.contains(Pool, "checkout", _secure_delete):
        event.listen(Pool, "checkout", _secure_delete)


def _secure_delete(connection: Any, record: Any, proxy: Any) -> None:
    import sqlite3

    if isinstance(connection, sqlite3.Connection):
        connection.execute("PRAGMA secure_delete = ON")


def purge_models(tracking_uri: str, name: str, keep_version: str | None, request_ids: list[str],
                 artifact_root: Path, backend_store_uri: str = "", retain_until: str | None = None,
                 artifacts_destination: str = "") -> dict[str, Any]:
    """Delete every registered version of ``name`` except ``keep_version``, their logged models, then gc.

    Every earlier version was trained on data that held the forgotten samples (data only ever shrinks by
    forgetting), so all of them are residue. Run metadata that holds only digests stays, tagged as superseded.
    With ``retain_until`` (an ISO date, from ``purge.retention_days``) superseded versions are kept and tagged
    ``legonet.purge_after``; any forget on or after that date deletes them. With ``artifacts_destination`` (the
    server's S3 ``--artifacts-destination``) every object version of a logged model that is not live is deleted
    from the bucket too.
    """
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    zero_deleted_sqlite_rows()
    client = MlflowClient(tracking_uri)
    today = datetime.now(UTC).date().isoformat()
    deleted_versions, logged_models, leftovers, retained = [], [], [], {}
    for version in client.search_model_versions(f"name='{name}'"):
        if version.version == keep_version:
            continue
        model_id = getattr(version, "model_id", None) or _model_id(version.source)
        run_id = version.tags.get("package_run_id") or version.run_id
        if run_id:
            client.set_tag(run_id, "legonet.superseded_by", ",".join(request_ids))
        due = version.tags.get("legonet.purge_after") or retain_until
        if due is not None and due > today:
            client.set_model_version_tag(name, version.version, "legonet.purge_after", due)
            retained[version.version] = due
            continue
        client.delete_model_version(name, version.version)
        deleted_versions.append(version.version)
        if model_id:
            client.delete_logged_model(model_id)
            logged_models.append(model_id)
    # gc every logged model in the deleted stage (also those deleted by an attempt that crashed before gc)
    # with an `mlflow server`, gc needs its backend store (the database) and resolves artifacts through it.
    # `mlflow gc` runs in this process: a child process would import MLflow and open the store again.
    from mlflow.cli import gc

    try:
        gc.main(["--backend-store-uri", backend_store_uri or tracking_uri, "--tracking-uri", tracking_uri],
                standalone_mode=False)
    except Exception as exc:  # click and MLflow raise their own kinds; the journal keeps the step pending
        raise StoreError(f"mlflow gc failed (the purge step stays pending): {exc}") from exc
    live = live_logged_models(client)
    for folder in sorted(artifact_root.glob("m-*")) if artifact_root.is_dir() else []:
        if folder.name not in live:  # gc could not resolve it (or never knew it): remove it and say so
            shutil.rmtree(folder)
            leftovers.append(folder.name)
    store = purge_artifact_store(artifacts_destination, live) if artifacts_destination else None
    return {"deleted_model_versions": sorted(deleted_versions, key=int),
            "deleted_logged_models": sorted(logged_models),
            "removed_after_gc_skipped": leftovers, "retained_model_versions": retained,
            **({"artifact_store": store} if store else {})}


def live_logged_models(client: Any) -> set[str]:
    """Every logged model id the store still holds, all pages: one call returns at most 100 (newest first), and
    a folder missing from the set is deleted as gc residue, so a partial list would delete live models."""
    ids = experiment_ids(client)
    live: set[str] = set()
    token = None
    while True:
        page = client.search_logged_models(experiment_ids=ids, page_token=token)
        live.update(m.model_id for m in page)
        token = page.token
        if not token:
            return live


def experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _model_id(source: str) -> str | None:
    return source.split("/")[1] if source.startswith("models:/m-") else None


def vacuum_sqlite(tracking_uri: str) -> None:
    """Compact a SQLite store that an `mlflow server` deleted rows from: its connections do not zero deleted
    content (``zero_deleted_sqlite_rows`` covers this process's only), so they could linger in free pages."""
    if tracking_uri.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as db:
            db.execute("VACUUM")
