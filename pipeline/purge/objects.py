"""Purge of DVC objects: delete superseded versions of forgotten data by hash from the cache and every remote.

DVC has no targeted version deletion (``dvc gc`` keeps or drops whole commits), so objects are removed here by
hash from the project cache and from every configured DVC remote: local directories by path, S3 buckets (and
S3-compatible stores) with boto3, every version of an object where the bucket keeps versions.
docs/remote-stores.md says how the stores are configured and which permissions this needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.data.dataset import read_yaml
from pipeline.errors import StoreError
from pipeline.purge.s3 import artifact_bucket, remote_bucket

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


