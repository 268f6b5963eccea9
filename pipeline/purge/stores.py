"""Purge residue: delete superseded versions of forgotten data and of models trained on it.

DVC has no targeted version deletion (``dvc gc`` keeps or drops whole commits), so objects are removed here by
hash from the project cache and from every configured DVC remote: local directories by path, S3 buckets (and
S3-compatible stores) with boto3, every version of an object where the bucket keeps versions. MLflow model
versions and logged models that hold weights trained on forgotten samples are deleted and garbage-collected with
``mlflow gc``; their artifacts are then checked, because ``mlflow gc`` silently skips artifacts it cannot resolve
and, through a server's proxy, deletes only the current version of an object in a versioned bucket.
docs/remote-stores.md says how the stores are configured and which permissions this needs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.dataset import read_yaml

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
        for stage in (read_yaml(lock) or {}).get("stages", {}).values():
            add(stage.get("outs", []))
    for dvc_file in root.rglob("*.dvc"):
        if dvc_file.is_file() and not {".dvc", ".git"} & set(dvc_file.relative_to(root).parts[:-1]):
            add((read_yaml(dvc_file) or {}).get("outs", []))
    return expand_dirs(cache, hashes)


class StoreError(RuntimeError):
    """A configured store (DVC remote, MLflow server or its artifact bucket) cannot be reached or refuses a purge.

    The forget stops before its purge step is recorded, so the journal keeps the step pending and re-running the
    same command finishes it once the store answers.
    """


def dvc_remotes(root: Path) -> dict[str, dict[str, Any]]:
    """Every DVC remote as DVC resolves it: .dvc/config, config.local and the user's and system's config merged,
    local paths made absolute."""
    from dvc.config import Config

    return {name: dict(conf) for name, conf in Config(dvc_dir=root / ".dvc")["remote"].items()}


def local_remotes(root: Path) -> dict[str, Path]:
    """DVC remotes that are local directories (reached by path)."""
    return {name: Path(conf["url"]) for name, conf in dvc_remotes(root).items() if "://" not in conf["url"]}


def purge_objects(root: Path, stale: set[str], keep: set[str], forgotten: set[str]) -> dict[str, Any]:
    """Delete ``stale`` object hashes (minus any still referenced) from the cache and every DVC remote.

    In the cache and local remotes, also deletes any other unreferenced Parquet object whose ``sample_id`` column
    holds a forgotten ID (older versions left by earlier builds); an S3 remote would have to be downloaded whole
    for that, so there only the hash rule applies (`legonet audit verify` checks the remotes by hash).
    Returns what was deleted where (store, objects, versions, bytes) for the audit record.
    """
    cache = root / ".dvc" / "cache"
    doomed = stale - keep
    result = {"cache": _purge_local(cache, doomed, keep, forgotten)}
    for name, conf in dvc_remotes(root).items():
        if "://" not in conf["url"]:
            result[f"remote:{name}"] = _purge_local(Path(conf["url"]), doomed, keep, forgotten)
        else:
            result[f"remote:{name}"] = remote_bucket(name, conf).purge(lambda rel: _object_hash(rel) in doomed)
    return result


def _purge_local(base: Path, doomed: set[str], keep: set[str], forgotten: set[str]) -> dict[str, Any]:
    gone = {h for h in doomed if object_path(base, h).exists()} | _holding_ids(base, keep, forgotten)
    size = 0
    for md5 in sorted(gone):
        path = object_path(base, md5)
        size += path.stat().st_size if path.is_file() else 0
        path.unlink(missing_ok=True)
    return {"store": str(base), "deleted_objects": len(gone), "bytes": size}


def _object_hash(rel: str) -> str | None:
    """The md5 a DVC 3 object key names (``files/md5/ab/cdef...`` relative to the remote's root), else None."""
    parts = rel.split("/")
    return parts[2] + parts[3] if len(parts) == 4 and parts[:2] == ["files", "md5"] else None


# --- S3 stores ---

_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError")
_PERMISSION = {"ListObjectVersions": "s3:ListBucketVersions", "ListObjectsV2": "s3:ListBucket",
               "HeadBucket": "s3:ListBucket", "GetBucketVersioning": "s3:GetBucketVersioning",
               "DeleteObjects": "s3:DeleteObject and s3:DeleteObjectVersion"}  # by the API call refused


@dataclass(frozen=True)
class Bucket:
    """One S3 prefix (a DVC remote's root, an MLflow artifact destination) and a client with its credentials."""

    client: Any
    name: str
    prefix: str  # without leading or trailing slash
    label: str  # how messages and the audit record name the store

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}".rstrip("/")

    @contextmanager
    def _calls(self, action: str) -> Iterator[None]:
        """Map boto3's errors to one StoreError line that says which store, what failed and what to do."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                raise StoreError(f"{self.label} ({self.url}): the credentials may not {action} ({code}); grant "
                                 f"{_PERMISSION.get(exc.operation_name, exc.operation_name)} "
                                 "(docs/remote-stores.md lists what purge needs)") from None
            raise StoreError(f"{self.label} ({self.url}): {action} failed: {code} {exc}") from None
        except BotoCoreError as exc:
            kind = "unreachable" if type(exc).__name__ in _UNREACHABLE else "failed"
            raise StoreError(f"{self.label} ({self.url}) {kind} while trying to {action}: {exc}; the purge step "
                             "stays pending: re-run the same `legonet forget` when the store answers") from None

    def probe(self) -> None:
        with self._calls("reach the bucket"):
            self.client.head_bucket(Bucket=self.name)

    def versioned(self) -> bool:
        """Whether the bucket keeps (or once kept) old versions: then every version of an object must go."""
        with self._calls("read the bucket's versioning"):
            status = self.client.get_bucket_versioning(Bucket=self.name).get("Status")
        return status in ("Enabled", "Suspended")

    def entries(self, versions: bool) -> Iterator[dict[str, Any]]:
        """Every object (every version and delete marker, with ``versions``) under the prefix: Key, VersionId, Size,
        and ``rel``, the key relative to the prefix."""
        start = f"{self.prefix}/" if self.prefix else ""
        operation = "list_object_versions" if versions else "list_objects_v2"
        with self._calls("list the objects' versions" if versions else "list the objects"):
            for page in self.client.get_paginator(operation).paginate(Bucket=self.name, Prefix=start):
                for item in [*page.get("Versions", []), *page.get("Contents", []), *page.get("DeleteMarkers", [])]:
                    yield {"Key": item["Key"], "VersionId": item.get("VersionId") if versions else None,
                           "Size": item.get("Size", 0), "rel": item["Key"][len(start):]}

    def purge(self, doomed: Callable[[str], bool]) -> dict[str, Any]:
        """Delete every object (every version, where the bucket keeps them) whose relative key ``doomed`` selects."""
        versioned = self.versioned()
        chosen = [e for e in self.entries(versioned) if doomed(e["rel"])]
        for at in range(0, len(chosen), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": e["Key"], **({"VersionId": e["VersionId"]} if e["VersionId"] else {})}
                     for e in chosen[at:at + 1000]]
            action = "delete object versions" if versioned else "delete objects"
            with self._calls(action):
                errors = self.client.delete_objects(Bucket=self.name, Delete={"Objects": batch, "Quiet": True}
                                                    ).get("Errors", [])
            if errors:
                first = errors[0]
                grant = "s3:DeleteObjectVersion" if versioned else "s3:DeleteObject"
                raise StoreError(f"{self.label} ({self.url}): {len(errors)} object(s) not deleted ({first.get('Code')} "
                                 f"on {first.get('Key')}: {first.get('Message')}); the credentials must be allowed "
                                 f"{grant}: refusing to record a purge that did not happen")
        return {"store": self.url, "versioned": versioned, "deleted_objects": len({e["Key"] for e in chosen}),
                "deleted_versions": len(chosen), "bytes": sum(e["Size"] for e in chosen)}


def _bucket(url: str, session: Any, label: str, **client: Any) -> Bucket:
    from urllib.parse import urlsplit

    from botocore.config import Config

    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"{label} ({url}): purge reaches local directories and s3:// stores only; delete the "
                         "superseded objects there by hand, or remove the remote (docs/remote-stores.md)")
    timeouts = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                      signature_version=client.pop("signature_version", None))
    return Bucket(session.client("s3", config=timeouts, **client), parts.netloc, parts.path.strip("/"), label)


def remote_bucket(name: str, conf: dict[str, Any]) -> Bucket:
    """A DVC S3 remote with the credentials DVC itself would use (``endpointurl``, keys, ``profile``,
    ``credentialpath``, ``region``, ``ssl_verify``, ``allow_anonymous_login`` from the merged DVC config)."""
    import boto3
    import botocore
    import botocore.session

    core = botocore.session.Session(profile=conf.get("profile"))
    for option, variable in (("credentialpath", "credentials_file"), ("configpath", "config_file")):
        if conf.get(option):
            core.set_config_variable(variable, conf[option])
    session = boto3.Session(botocore_session=core, aws_access_key_id=conf.get("access_key_id"),
                            aws_secret_access_key=conf.get("secret_access_key"),
                            aws_session_token=conf.get("session_token"), region_name=conf.get("region"))
    client = {"endpoint_url": conf.get("endpointurl"), "use_ssl": conf.get("use_ssl", True),
              "verify": conf.get("ssl_verify"),
              "signature_version": botocore.UNSIGNED if conf.get("allow_anonymous_login") else None}
    return _bucket(conf["url"], session, f"DVC remote '{name}'", **client)


def artifact_bucket(destination: str) -> Bucket:
    """The MLflow server's ``--artifacts-destination``, reached the way MLflow's own S3 store reaches it:
    ``MLFLOW_S3_ENDPOINT_URL``, ``MLFLOW_S3_IGNORE_TLS`` and the standard AWS credential chain."""
    import os

    import boto3

    verify = False if os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() == "true" else None
    return _bucket(destination, boto3.Session(), "MLflow artifact store",
                   endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, verify=verify)


def check_stores(root: Path, tracking_uri: str, artifacts_destination: str) -> None:
    """Reach every store the purge must change before changing any: an unreachable one fails fast (StoreError)."""
    import urllib.request

    for name, conf in dvc_remotes(root).items():
        if "://" in conf["url"]:
            remote_bucket(name, conf).probe()
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10):
                pass
        except OSError as exc:
            raise StoreError(f"MLflow server {tracking_uri} unreachable: {exc}; the purge step stays pending: "
                             "re-run the same `legonet forget` when it answers") from None
    if artifacts_destination:
        artifact_bucket(artifacts_destination).probe()


def push_remotes(root: Path) -> list[str]:
    """`dvc push` to every configured remote, so each holds what the new dvc.lock names (a fresh clone pulls)."""
    names = sorted(dvc_remotes(root))
    for name in names:
        result = subprocess.run([sys.executable, "-m", "dvc", "push", "-q", "-r", name], cwd=root,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise StoreError(f"`dvc push -r {name}` failed, the purge step stays pending (re-run the same "
                             f"`legonet forget`): {(result.stdout + result.stderr).strip()[-600:]}")
    return names


def purge_artifact_store(destination: str, live: set[str]) -> dict[str, Any]:
    """Delete from the MLflow artifact bucket every object (every version) of a logged model that is not live.

    Keys look like ``<prefix>/<experiment id>/models/<model id>/artifacts/...``. ``mlflow gc`` through a server
    deletes the current objects only, so old versions and delete markers in a versioned bucket are found here.
    """
    def dead(rel: str) -> bool:
        parts = rel.split("/")
        return len(parts) > 3 and parts[1] == "models" and parts[2].startswith("m-") and parts[2] not in live

    return artifact_bucket(destination).purge(dead)


def remote_residue(root: Path, records: list[dict[str, Any]]) -> list[str]:
    """`legonet audit verify`: the problems of every configured DVC remote that still stores an object of an
    artifact a forget superseded (the ``before`` digests of each record's changed artifacts, DVC's md5 of the
    file) and that the workspace no longer references. An unreachable remote is a problem too: not checked."""
    superseded = {change["before"] for record in records
                  for change in record["predicate"].get("artifacts", {}).values()
                  if change.get("before") and change.get("before") != change.get("after")}
    superseded -= referenced_objects(root, root / ".dvc" / "cache")
    if not superseded:
        return []
    problems = []
    for name, conf in dvc_remotes(root).items():
        if "://" not in conf["url"]:
            found = sorted(h for h in superseded if object_path(Path(conf["url"]), h).exists())
            store = conf["url"]
        else:
            bucket = remote_bucket(name, conf)
            store = bucket.url
            try:
                found = sorted({h for e in bucket.entries(bucket.versioned()) if (h := _object_hash(e["rel"]))
                                in superseded})
            except StoreError as exc:
                problems.append(f"not checked: {exc}")
                continue
        if found:
            problems.append(f"DVC remote '{name}' ({store}) still stores {len(found)} object(s) of artifacts "
                            f"superseded by a forget, e.g. files/md5/{found[0][:2]}/{found[0][2:]}")
    return problems


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


def preload() -> None:
    """Import MLflow's gc, which ``purge_models`` runs in its process (a forget's stage worker calls this while the
    forget plans and retrains, so the purge step does not wait ~1.5 s for the import)."""
    import mlflow.cli  # noqa: F401

    zero_deleted_sqlite_rows()


def zero_deleted_sqlite_rows() -> None:
    """Have every SQLite connection this process's SQLAlchemy pools hand out overwrite deleted content with zeros
    (``PRAGMA secure_delete``), so the rows a purge deletes through MLflow leave no bytes in free pages or inside
    pages. A ``VACUUM`` after the purge did this by rewriting the whole store, which grows with every forget's
    lineage runs (0.10 -> 0.17 s per forget over a 200-request soak). Set on checkout, not on connect, so that
    connections MLflow opened before this call are covered too."""
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
    # `mlflow gc` runs in this process: a child process would import MLflow and open the store again (~3 s).
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
