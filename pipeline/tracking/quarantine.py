"""The quarantine in the registry: the model-version tag ``legonet.quarantine`` that servers and `legonet predict`
read and pass to the model (``params={"quarantine": [...]}``).

The tag is JSON, ``{"adapters": [sorted ints], "requests": [sorted request IDs], "published_at": "<UTC time>"}``;
no tag or an empty list is no quarantine. A version's quarantine only grows: every pending request's adapters are
added to each version a server may load (the versions an alias points at, and the newest, which `legonet predict`
falls back to). Only a new version lifts it: the package stage tags the version it registers with what is still
held (``pipeline.forget.requests.held``), so a version whose rebuild retrained a request's adapters is born without
that request's quarantine. The adapter list is in clear: whoever can read the registry can read it
(docs/requests.md).
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from pipeline.errors import QuarantineUnreadable
from pipeline.tracking.head import server_call
from pipeline.tracking.lineage import absolute_store

TAG = "legonet.quarantine"


def parse(value: str | None, version: str = "?") -> dict[str, Any]:
    """A tag's content (an empty quarantine for no tag); a malformed tag is QuarantineUnreadable, never "no
    quarantine"."""
    if not value:
        return {"adapters": [], "requests": []}
    try:
        content = json.loads(value)
    except json.JSONDecodeError as exc:
        raise QuarantineUnreadable(f"model version {version}: tag {TAG} is not JSON ({exc})") from exc
    adapters = content.get("adapters") if isinstance(content, dict) else None
    if not isinstance(adapters, list) or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0
                                                 for a in adapters):
        raise QuarantineUnreadable(f"model version {version}: tag {TAG} is not a quarantine (no list of adapter "
                                   f"numbers): {value[:200]}")
    return content


def adapters_of(tags: Mapping[str, str]) -> list[int]:
    """The adapters a version's tags quarantine."""
    return sorted(int(a) for a in parse(tags.get(TAG))["adapters"])


def read(tags: Mapping[str, str], version: str) -> tuple[frozenset[int], dict[str, Any] | None]:
    """The adapters version ``version`` must not consult, and the raw tag (None without one), from its tags."""
    raw = tags.get(TAG)
    return (frozenset(), None) if raw is None else (frozenset(parse(raw, version)["adapters"]), json.loads(raw))


def value(adapters: Iterable[int], requests: Iterable[str], at: str) -> str:
    return json.dumps({"adapters": sorted({int(a) for a in adapters}), "requests": sorted(set(requests)),
                       "published_at": at}, sort_keys=True, separators=(",", ":"))


def tag_version(client: Any, name: str, version: str, adapters: Iterable[int], requests: Iterable[str], at: str
                ) -> None:
    """Set a new version's quarantine (nothing when nothing is held: no tag is no quarantine)."""
    adapters = list(adapters)
    if adapters:
        client.set_model_version_tag(name, version, TAG, value(adapters, requests, at))


def publish(root: Path, settings: Mapping[str, Any], adapters: Iterable[int], requests: Iterable[str], at: str
            ) -> dict[str, list[int]]:
    """Add ``adapters`` (of ``requests``) to the quarantine of every version a server may load (the versions an
    alias points at, and the newest); return each version's quarantine now. Idempotent: publishing again changes
    nothing but ``published_at``.

    Written like the audit head (pipeline.tracking.head): a SQLite store in one transaction, an `mlflow server`
    over its REST API, without importing MLflow, so a forget publishes at once rather than after the seconds
    MLflow's import takes (a server applies the tag within its poll)."""
    uri, name = absolute_store(str(settings["tracking_uri"]), root), str(settings["registered_model"])
    adapters = {int(a) for a in adapters}
    if uri.startswith("sqlite:///"):
        return _publish_sqlite(Path(uri.removeprefix("sqlite:///")), name, adapters, list(requests), at)
    return _publish_server(uri.rstrip("/"), name, adapters, list(requests), at)


def _merged(current: str | None, adapters: set[int], requests: list[str], at: str, version: str
            ) -> tuple[str, list[int]]:
    now = parse(current, version)
    merged = sorted(set(now["adapters"]) | adapters)
    return value(merged, [*now["requests"], *requests], at), merged


def _publish_sqlite(path: Path, name: str, adapters: set[int], requests: list[str], at: str) -> dict[str, list[int]]:
    if not path.is_file():
        return {}
    published = {}
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")  # read, merge and write as one step: two publishers never lose an adapter
        try:
            live = "name = ? AND (current_stage IS NULL OR current_stage != 'Deleted_Internal')"
            newest = db.execute(f"SELECT MAX(version) FROM model_versions WHERE {live}", (name,)).fetchone()[0]
            if newest is None:
                db.execute("ROLLBACK")
                return {}
            aliased = {v for (v,) in db.execute("SELECT version FROM registered_model_aliases WHERE name = ?",
                                                 (name,))}
            for version in sorted(aliased | {newest}):
                row = db.execute("SELECT value FROM model_version_tags WHERE name = ? AND version = ? AND key = ?",
                                 (name, version, TAG)).fetchone()
                tag, published[str(version)] = _merged(row[0] if row else None, adapters, requests, at, str(version))
                db.execute("INSERT OR REPLACE INTO model_version_tags (key, value, name, version) VALUES (?, ?, ?, ?)",
                           (TAG, tag, name, version))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return published


def _publish_server(uri: str, name: str, adapters: set[int], requests: list[str], at: str) -> dict[str, list[int]]:
    model = server_call(uri, "GET", f"get?{urllib.parse.urlencode({'name': name})}", None, name)
    if model is None:
        return {}
    query = urllib.parse.urlencode({"filter": f"name='{name}'", "order_by": "version_number DESC", "max_results": 1})
    found = (server_call(uri, "GET", f"model-versions/search?{query}", None, name) or {}).get("model_versions", [])
    aliased = {str(a["version"]) for a in model.get("registered_model", {}).get("aliases", [])}
    published = {}
    for version in sorted(aliased | {str(v["version"]) for v in found}, key=int):
        query = urllib.parse.urlencode({"name": name, "version": version})
        current = (server_call(uri, "GET", f"model-versions/get?{query}", None, name) or {}).get("model_version", {})
        tag = next((t.get("value") for t in current.get("tags", []) if t.get("key") == TAG), None)
        tag, published[version] = _merged(tag, adapters, requests, at, version)
        server_call(uri, "POST", "model-versions/set-tag", {"name": name, "version": version, "key": TAG,
                                                            "value": tag}, name)
    return published
