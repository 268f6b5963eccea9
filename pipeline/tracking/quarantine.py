"""The quarantine in the registry: the model-version tag ``legonet.quarantine`` that servers and `legonet predict`
read and pass to the model (``params={"quarantine": [...]}``).

The tag is JSON, ``{"adapters": [sorted ints], "requests": [sorted request IDs], "published_at": "<UTC time>"}``;
no tag or an empty list is no quarantine. A version's quarantine only grows: every pending request's adapters are
added to each version a server may load (the versions an alias points at, and the newest, which `legonet predict`
falls back to). Only a new version lifts it: the package stage tags the version it registers with what is still
held (``pipeline.forget.deferred.held``), so a version whose rebuild retrained a request's adapters is born without
that request's quarantine. The adapter list is in clear: whoever can read the registry can read it
(docs/requests.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import QuarantineUnreadable

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
    """Add ``adapters`` (of ``requests``) to the quarantine of every version a server may load; return each
    version's quarantine now. Idempotent: publishing again changes nothing but ``published_at``."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient

    from pipeline.tracking.lineage import configure
    from pipeline.tracking.registry import latest_version

    configure(settings["tracking_uri"], settings["experiment"], root)
    client, name = MlflowClient(), settings["registered_model"]
    latest = latest_version(name)
    if latest is None:
        return {}
    targets = {str(v) for v in client.get_registered_model(name).aliases.values()} | {str(latest.version)}
    published = {}
    for version in sorted(targets, key=int):
        now = parse(client.get_model_version(name, version).tags.get(TAG))
        merged = sorted(set(now["adapters"]) | {int(a) for a in adapters})
        client.set_model_version_tag(name, version, TAG, value(merged, [*now["requests"], *requests], at))
        published[version] = merged
    return published
