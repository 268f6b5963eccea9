"""A model version's quarantine as the registry holds it: the version tag ``legonet.quarantine``.

The tag is JSON ``{"adapters": [sorted ints], "requests": [...], "published_at": "<iso time>", ...}``, written by
`legonet forget` when it accepts a request (issue 23); no tag, or an empty ``adapters`` list, is no quarantine. The
server reads it on every poll and passes the adapters to each prediction (the model's ``quarantine`` param).

A tag that cannot be read is an error, never "no quarantine": serving the adapters a request named because their
list was malformed would answer from a forgotten sample. The server refuses to predict until it reads again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipeline.errors import ModelError

QUARANTINE_TAG = "legonet.quarantine"


class QuarantineUnreadable(ModelError):
    """The version's quarantine tag is not the JSON the contract names: the server stops predicting with it."""


def read_quarantine(tags: Mapping[str, str], version: str) -> tuple[frozenset[int], dict[str, Any] | None]:
    """The adapters version ``version`` must not consult, and the raw tag (for /version), from its tags."""
    raw = tags.get(QUARANTINE_TAG)
    if raw is None:
        return frozenset(), None
    try:
        tag = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise QuarantineUnreadable(f"model version {version}: tag {QUARANTINE_TAG} is not JSON ({exc})") from exc
    adapters = tag.get("adapters", []) if isinstance(tag, dict) else None
    if not isinstance(adapters, list) or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0
                                                 for a in adapters):
        raise QuarantineUnreadable(f"model version {version}: tag {QUARANTINE_TAG} needs an `adapters` list of "
                                   f"adapter numbers, got {raw[:200]!r}")
    return frozenset(adapters), tag
