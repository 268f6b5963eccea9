"""Purge residue: delete superseded versions of forgotten data and of models trained on it.

DVC has no targeted version deletion (``dvc gc`` keeps or drops whole commits), so objects are removed here by
hash from the project cache and from a local-directory remote. MLflow model versions and logged models that hold
weights trained on forgotten samples are deleted and garbage-collected with ``mlflow gc``; their directories are
then checked, because ``mlflow gc`` silently skips artifacts it cannot resolve.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

DIR_SUFFIX = ".dir"


def object_path(cache: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object: ``<cache>/files/md5/ab/cdef...`` (``.dir`` objects keep their suffix)."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def expand_dirs(cache: Path, hashes: set[str]) -> set[str]:
    """The hashes plus the file hashes listed by each ``.dir`` object among them (read from the cache)."""
    out = set(hashes)
    for md5 in hashes:
        listing = object_path(cache, md5)
        if md5.endswith(DIR_SUFFIX) and listing.is_file():
            out.update(item["md5"] for item in json.loads(listing.read_text()))
    return out


def referenced_objects(root: Path, cache: Path) -> set[str]:
    """Every object hash the workspace's ``dvc.lock`` and ``.dvc`` files point at, directory listings expanded."""
    hashes: set[str] = set()

    def add(entries: Iterable[dict[str, Any]]) -> None:
        hashes.update(entry["md5"] for entry in entries if entry.get("md5"))

    lock = root / "dvc.lock"
    if lock.is_file():
        for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
            add(stage.get("outs", []))
    for dvc_file in root.rglob("*.dvc"):
        if dvc_file.is_file() and not {".dvc", ".git"} & set(dvc_file.relative_to(root).parts[:-1]):
            add((yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []))
    return expand_dirs(cache, hashes)


def local_remotes(root: Path) -> dict[str, Path]:
    """DVC remotes that are local directories (the only kind this purge can reach by path)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=root, capture_output=True, text=True)
    remotes = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "://" not in parts[1]:
            path = Path(parts[1])
            remotes[parts[0]] = path if path.is_absolute() else (root / ".dvc" / path).resolve()
    return remotes


def purge_objects(root: Path, stale: set[str], keep: set[str], forgotten: set[str]) -> dict[str, Any]:
    """Delete ``stale`` object hashes (minus any still referenced) from the cache and local remotes.

    Also deletes any other unreferenced Parquet object in those stores whose ``sample_id`` column holds a
    forgotten ID (older versions left by earlier builds). Returns counts per store for the audit record.
    """
    cache = root / ".dvc" / "cache"
    stores = {"cache": cache, **{f"remote:{name}": path for name, path in local_remotes(root).items()}}
    result: dict[str, Any] = {}
    for store, base in stores.items():
        doomed = {h for h in stale - keep if object_path(base, h).exists()}
        doomed |= _holding_ids(base, keep, forgotten)
        for md5 in sorted(doomed):
            object_path(base, md5).unlink(missing_ok=True)
        result[store] = {"deleted_objects": len(doomed), "path": str(base)}
    return result


def _holding_ids(base: Path, keep: set[str], forgotten: set[str]) -> set[str]:
    import pyarrow.parquet as pq

    found = set()
    objects = base / "files" / "md5"
    if not objects.is_dir() or not forgotten:
        return found
    for path in objects.glob("*/*"):
        md5 = path.parent.name + path.name
        if md5 in keep or path.suffix == DIR_SUFFIX:
            continue
        with open(path, "rb") as handle:
            if handle.read(4) != b"PAR1":
                continue
        try:
            ids = pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
        except (OSError, KeyError, ValueError):
            continue
        if forgotten.intersection(ids):
            found.add(md5)
    return found


def purge_models(tracking_uri: str, name: str, keep_version: str | None, request_ids: list[str],
                 artifact_root: Path, backend_store_uri: str = "", retain_until: str | None = None) -> dict[str, Any]:
    """Delete every registered version of ``name`` except ``keep_version``, their logged models, then gc.

    Every earlier version was trained on data that held the forgotten samples (data only ever shrinks by
    forgetting), so all of them are residue. Run metadata that holds only digests stays, tagged as superseded.
    With ``retain_until`` (an ISO date, from ``purge.retention_days``) superseded versions are kept and tagged
    ``legonet.purge_after``; any forget on or after that date deletes them.
    """
    from datetime import UTC, datetime

    from mlflow import MlflowClient

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
    # `mlflow gc` runs in this process: a child process would import MLflow and open the store again (~3 s).
    from mlflow.cli import gc

    try:
        gc.main(["--backend-store-uri", backend_store_uri or tracking_uri, "--tracking-uri", tracking_uri],
                standalone_mode=False)
    except Exception as exc:  # click and MLflow raise their own kinds; the journal keeps the step pending
        raise RuntimeError(f"mlflow gc failed: {exc}") from exc
    live = {m.model_id for m in client.search_logged_models(experiment_ids=experiment_ids(client))}
    for folder in sorted(artifact_root.glob("m-*")) if artifact_root.is_dir() else []:
        if folder.name not in live:  # gc could not resolve it (or never knew it): remove it and say so
            shutil.rmtree(folder)
            leftovers.append(folder.name)
    return {"deleted_model_versions": sorted(deleted_versions, key=int),
            "deleted_logged_models": sorted(logged_models),
            "removed_after_gc_skipped": leftovers, "retained_model_versions": retained}


def experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _model_id(source: str) -> str | None:
    return source.split("/")[1] if source.startswith("models:/m-") else None


def vacuum_sqlite(tracking_uri: str) -> None:
    """Compact the SQLite store so deleted rows do not linger in free pages."""
    if tracking_uri.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(tracking_uri.removeprefix("sqlite:///")) as db:
            db.execute("VACUUM")
