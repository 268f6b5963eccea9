"""Deletion requests as legonet keeps them, from the manifest to the record: the validated request, the journal of
the batch being applied, and the requests deferred to a later batch.

A request comes from a manifest (pipeline.forget.manifest reads and validates the file). A batch of requests being
applied is journalled in ``.legonet/journal.json`` (the forget's state machine, pipeline.forget.steps, writes it
after each step). A request deferred by `legonet forget --defer` waits in ``.legonet/requests/<request_id>/``
until `legonet requests run` (or any forget) retrains it, each before its deadline (``received_at`` +
``requests.sla_days``). All of ``.legonet/`` is outside git (the project's .gitignore and .dvcignore) and
owner-only, because journal and stored manifests hold raw sample IDs; a deferred request's folder holds the
manifest as received (the batch reads it like any manifest) and ``state.json`` (times, the adapters its samples
activate, ``received`` or ``quarantined``), and is deleted as soon as the forget that retrained it has written its
audit record. ``held`` is what the quarantine must cover at any moment: every request whose samples are still in
the project's data.

Every time legonet writes about a request comes from ``now``, so that tests drive deadlines with a fake clock
(``LEGONET_NOW``, an ISO time with its offset: a test hook, never set in production).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import ForgetError, ManifestError, ParamsError
from pipeline.forget.manifest import read_manifest
from pipeline.project.layout import STATE_DIR
from pipeline.project.scratch import write_private
from pipeline.tracking.quarantine import publish

JOURNAL = STATE_DIR / "journal.json"
REQUESTS = STATE_DIR / "requests"
CLOCK_ENV = "LEGONET_NOW"
DEFAULT_SLA_DAYS = 30
QUARANTINING = ("received", "quarantined")  # journal states in which the batch's rows are still in the data


@dataclass(frozen=True)
class DeletionRequest:
    """A validated deletion request; ``digest`` is the SHA-256 of the manifest file's bytes, for the audit."""

    request_id: str
    sample_ids: tuple[str, ...]
    reason: str
    received_at: str
    source: Path
    digest: str


def load_manifest(path: Path) -> DeletionRequest:
    """Read and fully validate one manifest (pipeline.forget.manifest); ``ManifestError`` on the first problem."""
    return DeletionRequest(source=Path(path), **read_manifest(path))


def merge_requests(requests: Sequence[DeletionRequest]) -> tuple[str, ...]:
    """The sorted union of the requests' sample IDs.

    The same ``request_id`` may appear twice (e.g. a retried request saved as JSON and as CSV) only with the
    same content; otherwise one of them is wrong, and guessing which would forget the wrong samples.
    """
    seen: dict[str, DeletionRequest] = {}
    for request in requests:
        earlier = seen.setdefault(request.request_id, request)
        if _content(earlier) != _content(request):
            raise ManifestError(
                f"{request.source}: request_id {request.request_id!r} is also used by {earlier.source} with "
                "different content; give each request its own request_id"
            )
    return tuple(sorted({sample_id for request in requests for sample_id in request.sample_ids}))


def _content(request: DeletionRequest) -> tuple[object, ...]:
    return frozenset(request.sample_ids), request.reason, request.received_at


@dataclass
class Journal:
    """The batch being applied: its requests, its plan (``pipeline.forget.flow.Plan`` as a dict), the state it
    reached and what each step measured."""

    batch: str
    request_ids: list[str]
    manifest_digests: dict[str, str]
    sample_ids: list[str]
    request_samples: dict[str, list[str]]
    request_meta: dict[str, dict[str, str]]
    plan: dict[str, Any]
    state: str = "received"
    before: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, root: Path) -> None:
        """Durably and privately: the journal holds raw sample IDs, so it is 0600 in a 0700 folder."""
        write_private(root / JOURNAL, (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, root: Path) -> Journal | None:
        path = root / JOURNAL
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def now() -> datetime:
    """The time legonet stamps on requests: the wall clock, or ``LEGONET_NOW`` when a test sets it."""
    fake = os.environ.get(CLOCK_ENV)
    if not fake:
        return datetime.now(UTC)
    at = datetime.fromisoformat(fake)
    if at.tzinfo is None:
        raise ParamsError(f"{CLOCK_ENV}={fake!r} has no UTC offset; give one, e.g. 2026-01-31T12:00:00+00:00")
    return at.astimezone(UTC)


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds")


def received_time(value: str) -> datetime:
    """A manifest's ``received_at`` as an aware UTC time: a date is its midnight, a time without offset is UTC."""
    parsed = datetime.fromisoformat(value)  # the manifest check accepted it; a bare date is its midnight
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def sla_days(params: dict[str, Any]) -> int:
    """``requests.sla_days``: how long after ``received_at`` a request must be retrained and purged."""
    value = (params.get("requests") or {}).get("sla_days", DEFAULT_SLA_DAYS)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamsError(f"params.yaml: requests.sla_days is {value!r}; give a whole number of days >= 1 "
                          "(GDPR: 30, CCPA: 45)")
    return value


def deadline(received_at: str, params: dict[str, Any]) -> datetime:
    return received_time(received_at) + timedelta(days=sla_days(params))


@dataclass
class Deferred:
    """One deferred request as ``state.json`` has it (``manifest``: the stored copy, relative to the project)."""

    request_id: str
    manifest: str
    digest: str
    received_at: str
    deadline: str
    accepted_at: str
    adapters: list[int]
    allow_unknown: bool = False  # deferred with --allow-unknown: the batch records unknown IDs as not present
    state: str = "received"  # -> "quarantined" once the registry holds its quarantine
    quarantined_at: str | None = None

    def due(self, at: datetime, within: timedelta = timedelta(0)) -> bool:
        return datetime.fromisoformat(self.deadline) <= at + within


def folder(root: Path, request_id: str) -> Path:
    return root / REQUESTS / request_id


def store(root: Path, request: DeletionRequest, adapters: Iterable[int], params: dict[str, Any],
          allow_unknown: bool = False) -> Deferred:
    """Keep the request (its manifest bytes and state) until a batch retrains it; the manifest is copied byte for
    byte so the batch computes the same request digest."""
    place = folder(root, request.request_id)
    (root / REQUESTS).mkdir(mode=0o700, parents=True, exist_ok=True)
    copy = place / f"manifest{request.source.suffix}"
    write_private(copy, request.source.read_bytes())
    item = Deferred(request.request_id, copy.relative_to(root).as_posix(), request.digest, request.received_at,
                    stamp(deadline(request.received_at, params)), stamp(now()), sorted(set(adapters)), allow_unknown)
    save(root, item)
    return item


def save(root: Path, item: Deferred) -> None:
    write_private(folder(root, item.request_id) / "state.json",
                        (json.dumps(asdict(item), indent=1, sort_keys=True) + "\n").encode())


def pending(root: Path, clean: bool = False) -> list[Deferred]:
    """Every deferred request not yet retrained, earliest deadline first. A folder without ``state.json`` is a
    defer that crashed before its state was written (or one being written now): it is no request yet; ``clean``
    (under the project lock, so no defer is writing) removes it, since its manifest holds raw IDs."""
    items = []
    base = root / REQUESTS
    for place in sorted(base.iterdir()) if base.is_dir() else []:
        state = place / "state.json"
        if not state.is_file():
            if clean:
                shutil.rmtree(place)
            continue
        items.append(Deferred(**json.loads(state.read_text())))
    return sorted(items, key=lambda d: (d.deadline, d.request_id))


def drop(root: Path, request_ids: Iterable[str]) -> None:
    """Delete the stored manifests (raw IDs) of requests whose forget is recorded."""
    for request_id in request_ids:
        shutil.rmtree(folder(root, request_id), ignore_errors=True)


def held(root: Path) -> tuple[list[int], list[str]]:
    """(adapters, request IDs) the quarantine must cover now: the deferred requests and a journalled forget whose
    samples are still in the data (its rows not yet removed); a batch past removal is left out, so the version its
    rebuild registers lifts exactly what it retrained."""
    journal = Journal.load(root)
    removed = set(journal.request_ids) if journal is not None and journal.state not in QUARANTINING else set()
    adapters: set[int] = set()
    requests: set[str] = set()
    for item in pending(root):
        if item.request_id not in removed:
            adapters.update(item.adapters)
            requests.add(item.request_id)
    if journal is not None and not removed:
        adapters.update(int(a) for a in journal.plan["adapters"])
        requests.update(journal.request_ids)
    return sorted(adapters), sorted(requests)


def check_deadlines(root: Path, say: Any, at: datetime | None = None) -> list[Deferred]:
    """Warn loudly of every deferred request past its deadline (or within a day of it); return those past it."""
    at = at or now()
    items = pending(root)
    late = [d for d in items if d.due(at)]
    soon = [d for d in items if not d.due(at) and d.due(at, timedelta(days=1))]
    if late:
        say(f"[bold red]WARNING: {len(late)} deferred deletion request(s) are PAST their deadline: "
            f"{', '.join(f'{d.request_id} (due {d.deadline})' for d in late)}; run `legonet requests run` now")
    if soon:
        say(f"[bold yellow]warning:[/] deferred request(s) due within a day: "
            f"{', '.join(f'{d.request_id} (due {d.deadline})' for d in soon)}; run `legonet requests run`")
    return late


def refuse_late(request: DeletionRequest, params: dict[str, Any], at: datetime) -> None:
    """A request already past its deadline cannot wait for a batch."""
    due = deadline(request.received_at, params)
    if due <= at:
        raise ForgetError(f"{request.source}: request {request.request_id} was received {request.received_at}, so its "
                          f"deadline ({stamp(due)}, requests.sla_days {sla_days(params)}) has passed; run "
                          "`legonet forget` on it now, without --defer")


def times(journal: Journal, request_id: str, params: dict[str, Any]) -> dict[str, str | None]:
    """The times the audit record and the receipt carry for one request of a batch."""
    received = journal.request_meta[request_id]["received_at"]
    recorded = journal.results.get("times", {})
    return {"received": stamp(received_time(received)), "deadline": stamp(deadline(received, params)),
            "quarantined": recorded.get("quarantined", {}).get(request_id),
            "retrained": recorded.get("rebuilt"), "purged": recorded.get("purged")}


def quarantine(root: Path, journal: Journal, params: dict[str, Any], say: Callable[[str], None]) -> None:
    """Before any retraining: switch off, in every version a server may load, the adapters whose shards hold a
    sample of this batch or of a deferred request (the quarantine accumulates; only a new version lifts it). The
    record names it in its sealed part (which adapters a forget touched is for audit-key holders only)."""
    adapters, requests = held(root)
    at = stamp(now())
    published = publish(root, params["mlflow"], adapters, requests, at) if adapters else {}
    accepted = {d.request_id: d.quarantined_at for d in pending(root)}  # deferred: quarantined back then
    journal.results.setdefault("times", {})["quarantined"] = {r: accepted.get(r) or at for r in journal.request_ids}
    for request_id in journal.request_ids:
        journal.request_meta[request_id]["quarantine"] = {"adapters": journal.plan["adapters"], "versions": published}
    if published:
        say(f"quarantined adapters {adapters} in model version(s) {', '.join(published)} until retrained")
