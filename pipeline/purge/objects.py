"""Purge of DVC objects: delete, by digest, the objects a forget dooms from the DVC cache and every remote.

DVC has no targeted version deletion (``dvc gc`` keeps or drops whole commits), so objects are removed here by
digest from the cache DVC itself uses (``cache.dir`` from its merged config, which may be shared and outside the
project) and from every configured DVC remote: local directories by path, S3 buckets (and S3-compatible stores)
with boto3, every version of an object where the bucket keeps versions. Which objects are doomed is decided in
``pipeline.purge.history`` (the project's whole history, by provenance). A digest is checked against DVC's md5
form before any path is built from it, and nothing outside a store's object folder is unlinked.
docs/remote-stores.md says how the stores are configured and which permissions this needs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.audit.transparency import leaf_hash, root_hash
from pipeline.errors import StoreError
from pipeline.project.layout import STATE_DIR
from pipeline.project.scratch import write_private
from pipeline.purge.s3 import Bucket, artifact_bucket, remote_bucket
from pipeline.runner.parsed import read_yaml_once

DIR_SUFFIX = ".dir"
DIGEST = re.compile(r"[0-9a-f]{32}(\.dir)?")  # DVC 3's md5 object id; a directory listing keeps ``.dir``


def valid_digest(value: object) -> bool:
    return isinstance(value, str) and DIGEST.fullmatch(value) is not None


def object_path(store: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object: ``<store>/files/md5/ab/cdef...`` (``.dir`` objects keep their suffix).

    Refuses anything but an md5 digest: a ``.dir`` listing or a journal is input, and an entry such as
    ``../../x`` must never become a path."""
    if not valid_digest(md5):
        raise ValueError(f"{str(md5)[:80]!r} is not a DVC md5 digest (32 hex digits, optional .dir)")
    return store / "files" / "md5" / md5[:2] / md5[2:]


def dvc_cache(root: Path) -> Path:
    """The cache directory DVC uses for this project (`dvc cache dir`): ``cache.dir`` from .dvc/config,
    config.local and the user's and system's config (relative to the config file that sets it), else
    ``.dvc/cache``; ``cache.local`` (a remote used as the cache) resolves to that remote's path."""
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    from dvc.config import Config

    config = Config(dvc_dir=root / ".dvc")  # merged, each relative path resolved from the file that sets it
    settings = config["cache"]
    if settings.get("local"):
        return Path(config["remote"][settings["local"]]["url"])
    return Path(settings.get("dir") or root / ".dvc" / "cache").resolve()


def listing_entries(data: bytes, md5: str) -> list[tuple[str, str]]:
    """(relpath, md5) of each file a ``.dir`` listing names. An entry whose digest is not an md5, or whose path
    is absolute or climbs out (``..``), never came from DVC: it is dropped, so nothing is built from it."""
    try:
        items = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"directory listing {md5}: not JSON ({exc}); restore it from a remote or remove it") from None
    entries = []
    for item in items if isinstance(items, list) else []:
        relpath, digest = (item.get("relpath"), item.get("md5")) if isinstance(item, dict) else (None, None)
        if isinstance(relpath, str) and valid_digest(digest) and not digest.endswith(DIR_SUFFIX) and relpath \
                and not relpath.startswith("/") and ".." not in relpath.split("/"):
            entries.append((relpath, digest))
    return entries


def expand_dirs(cache: Path, hashes: set[str]) -> set[str]:
    """The hashes plus the file hashes listed by each ``.dir`` object among them (read from the cache)."""
    out = {h for h in hashes if valid_digest(h)}
    for md5 in sorted(out):
        if md5.endswith(DIR_SUFFIX) and (listing := object_path(cache, md5)).is_file():
            out.update(digest for _, digest in listing_entries(listing.read_bytes(), md5))
    return out


def workspace_outputs(root: Path) -> Iterator[tuple[str, str]]:
    """(path, md5) of every output the workspace's ``dvc.lock`` and ``.dvc`` files record (paths as written)."""
    def outs(entries: Iterable[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        yield from ((str(e.get("path")), e["md5"]) for e in entries if isinstance(e, dict) and e.get("md5"))

    lock = root / "dvc.lock"
    if lock.is_file():
        for stage in (read_yaml_once(lock) or {}).get("stages", {}).values():
            yield from outs(stage.get("outs", []))
    for dvc_file in root.rglob("*.dvc"):
        if dvc_file.is_file() and not {".dvc", ".git"} & set(dvc_file.relative_to(root).parts[:-1]):
            yield from outs((read_yaml_once(dvc_file) or {}).get("outs", []))


def referenced_objects(root: Path, cache: Path) -> set[str]:
    """Every object hash the workspace's ``dvc.lock`` and ``.dvc`` files point at, directory listings expanded."""
    return expand_dirs(cache, {md5 for _, md5 in workspace_outputs(root)})


def dvc_remotes(root: Path) -> dict[str, dict[str, Any]]:
    """Every DVC remote as DVC resolves it: .dvc/config, config.local and the user's and system's config merged,
    local paths made absolute."""
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    from dvc.config import Config

    return {name: dict(conf) for name, conf in Config(dvc_dir=root / ".dvc")["remote"].items()}


def local_remotes(root: Path) -> dict[str, Path]:
    """DVC remotes that are local directories (reached by path)."""
    return {name: Path(conf["url"]) for name, conf in dvc_remotes(root).items() if "://" not in conf["url"]}


class Stores:
    """The project's DVC stores as DVC resolves them: the cache, local remotes (by path), S3 remotes (boto3)."""

    def __init__(self, root: Path) -> None:
        self.cache = dvc_cache(root)
        self.local: dict[str, Path] = {"cache": self.cache}
        self.buckets: dict[str, Bucket] = {}
        for name, conf in dvc_remotes(root).items():
            if "://" not in conf["url"]:
                self.local[f"remote:{name}"] = Path(conf["url"])
            else:
                self.buckets[f"remote:{name}"] = remote_bucket(name, conf)
        self._listed: dict[str, set[str]] = {}

    def read(self, md5: str) -> Path | bytes | None:
        """An object's content: the path of a local copy, else the bytes from an S3 remote, else None."""
        for store in self.local.values():
            if (path := object_path(store, md5)).is_file():
                return path
        for label, bucket in self.buckets.items():
            if label not in self._listed:  # one listing per remote, not one request per absent object
                self._listed[label] = {h for e in bucket.entries(False) if (h := object_hash(e["rel"]))}
            if md5 in self._listed[label]:
                return bucket.read(f"files/md5/{md5[:2]}/{md5[2:]}")
        return None


def merkle_root(digests: Iterable[str]) -> str:
    """SHA-256 RFC 6962 Merkle root of the sorted digests: what the record carries instead of the list."""
    return root_hash([leaf_hash(d.encode()) for d in sorted(set(digests))]).hex()


def summarise(digests: Mapping[str, Iterable[str]]) -> dict[str, dict[str, Any]]:
    """Per kind of doomed object, the count and the Merkle root of the sorted digests: what the audit record
    carries (a root commits to the exact list without publishing it; the list is kept in the purged map)."""
    return {kind: {"objects": len(set(found)), "merkle_root": merkle_root(found)} for kind, found in digests.items()}


def purge_objects(root: Path, doomed: Mapping[str, Iterable[str]], keep: set[str]) -> dict[str, Any]:
    """Delete the ``doomed`` digests (by kind: ``superseded`` by this forget, ``history`` objects derived from a
    forgotten sample) minus any still referenced, from the cache and every DVC remote.

    Returns per store what was deleted (objects, versions, bytes) and, per kind, the count and Merkle root of the
    digests deleted there, for the audit record.
    """
    kinds = {kind: {d for d in digests if valid_digest(d)} - keep for kind, digests in doomed.items()}
    every = set().union(*kinds.values())
    stores = Stores(root)
    result = {label: _purge_local(base, every) for label, base in stores.local.items()}
    for label, bucket in stores.buckets.items():
        found: set[str] = set()

        def chosen(rel: str, found: set[str] = found) -> bool:
            if (md5 := object_hash(rel)) in every:
                found.add(md5)
                return True
            return False

        result[label] = {**bucket.purge(chosen), "digests": found}
    for summary in result.values():
        gone = summary.pop("digests")
        summary.update(summarise({kind: digests & gone for kind, digests in kinds.items()}))
    return result


def _purge_local(base: Path, doomed: set[str]) -> dict[str, Any]:
    """Unlink each doomed object found under ``base/files/md5`` (the entry itself, never a link's target); an
    object folder that resolves anywhere else than there (a planted link) is left alone and counted."""
    objects = base.resolve() / "files" / "md5"
    gone, size, outside = set(), 0, 0
    for md5 in sorted(doomed):
        path = object_path(base, md5)
        if not path.is_file() and not path.is_symlink():
            continue
        if not path.parent.resolve().is_relative_to(objects):
            outside += 1
            continue
        size += path.lstat().st_size
        path.unlink(missing_ok=True)
        gone.add(md5)
    return {"store": str(base), "deleted_objects": len(gone), "bytes": size, "digests": gone,
            **({"refused_outside_store": outside} if outside else {})}


def object_hash(rel: str) -> str | None:
    """The md5 a DVC 3 object key names (``files/md5/ab/cdef...`` relative to the remote's root), else None."""
    parts = rel.split("/")
    md5 = parts[2] + parts[3] if len(parts) == 4 and parts[:2] == ["files", "md5"] else None
    return md5 if valid_digest(md5) else None


# --- S3 stores ---

def check_stores(root: Path, tracking_uri: str, artifacts_destination: str) -> None:
    """Reach every store the purge must change before changing any: an unreachable one fails fast (StoreError)."""
    for name, conf in dvc_remotes(root).items():
        if "://" in conf["url"]:
            remote_bucket(name, conf).probe()
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10):
                pass
        except OSError as exc:
            raise StoreError(f"MLflow server {tracking_uri} unreachable: {exc}") from None
    if artifacts_destination:
        artifact_bucket(artifacts_destination).probe()


def push_remotes(root: Path) -> list[str]:
    """`dvc push` to every configured remote, so each holds what the new dvc.lock names (a fresh clone pulls)."""
    names = sorted(dvc_remotes(root))
    for name in names:
        result = subprocess.run([sys.executable, "-m", "dvc", "push", "-q", "-r", name], cwd=root,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise StoreError(f"`dvc push -r {name}` failed: {(result.stdout + result.stderr).strip()[-600:]}")
    return names



PURGED = STATE_DIR / "purged.json"  # digest -> the requests whose forget purged it (no sample data)


def purged_map(root: Path) -> dict[str, list[str]]:
    """Which request purged each digest, so a checkout of an old commit can say why an object is gone."""
    path = root / PURGED
    return json.loads(path.read_text()) if path.is_file() else {}


def record_purged(root: Path, digests: Iterable[str], request_ids: list[str]) -> None:
    """Add ``digests`` to the purged map under ``request_ids`` (idempotent: a resumed purge adds nothing new)."""
    known = purged_map(root)
    for md5 in digests:
        known[md5] = sorted(set(known.get(md5, [])) | set(request_ids))
    write_private(root / PURGED, (json.dumps(known, sort_keys=True) + "\n").encode())


def remote_residue(root: Path, records: list[dict[str, Any]]) -> list[str]:
    """`legonet audit verify`: the problems of every DVC store (the cache, each remote) that still holds an
    object a forget purged (the purged map) or superseded (the ``before`` digests of each record's changed
    artifacts, DVC's md5 of the file) and that the workspace no longer references. An unreachable remote is a
    problem too: not checked."""
    superseded = {change["before"] for record in records
                  for change in record["predicate"].get("artifacts", {}).values()
                  if change.get("before") and change.get("before") != change.get("after")}
    stores = Stores(root)
    gone = {d for d in superseded | set(purged_map(root)) if valid_digest(d)}
    gone -= referenced_objects(root, stores.cache)
    if not gone:
        return []
    problems = []
    for label, base in stores.local.items():
        found = sorted(h for h in gone if object_path(base, h).exists())
        problems += _residue_problem(label, str(base), found)
    for label, bucket in stores.buckets.items():
        try:
            found = sorted({h for e in bucket.entries(bucket.versioned()) if (h := object_hash(e["rel"])) in gone})
        except StoreError as exc:
            problems.append(f"not checked: {exc}")
            continue
        problems += _residue_problem(label, bucket.url, found)
    return problems


def _residue_problem(label: str, store: str, found: list[str]) -> list[str]:
    where = "DVC cache" if label == "cache" else f"DVC remote '{label.removeprefix('remote:')}'"
    return [f"{where} ({store}) still stores {len(found)} object(s) a forget purged or superseded, e.g. "
            f"files/md5/{found[0][:2]}/{found[0][2:]}"] if found else []
