"""The audit log as the forget sees it: which requests and IDs it already holds, and the signed records of a batch.

The forget's one entry into pipeline.audit (docs/design.md section 5, step "audited"): the flow hands over what it
measured (digests before and after, the stages run, the purge) and gets back the checkpoint it must keep. Keys,
envelopes and the transparency log stay behind this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.audit import disclosure
from pipeline.audit.disclosure import changes
from pipeline.audit.keyring import anchor, audit_key, audit_keys, audit_log, in_project_note, origin, signing_key
from pipeline.audit.secrets import audit_key_id, forgotten_by, id_digest, seal
from pipeline.data.quality import RESULT, read_result
from pipeline.project.params import params_digest
from pipeline.tracking.lineage import file_sha256, git_revision, platform_tags


@dataclass(frozen=True)
class Forgotten:
    """ids -> {id: the requests that forgot it} for the IDs the audit log lists as forgotten (``forgotten_by``), and
    ``head``: a digest of which IDs those are (each record's request, audit key and keyed IDs, and the audit keys at
    hand), for a mark that the data held none of them (pipeline.forget.flow.CLEAN) to name the log it was made
    against."""

    lookup: Callable[[Iterable[str]], dict[str, list[str]]]
    head: str

    def __call__(self, sample_ids: Iterable[str]) -> dict[str, list[str]]:
        return self.lookup(sample_ids)


def recorded_requests(root: Path, params: dict[str, Any]) -> set[str]:
    """The request IDs the (verified) audit log holds."""
    return {r["request_id"] for r in audit_log(root, params, memo=True).summaries()}


def forgotten_lookup(root: Path, params: dict[str, Any]) -> Forgotten:
    """ids -> {id: the requests that forgot it} for the IDs the audit log lists as forgotten."""
    log = audit_log(root, params, memo=True)
    records = log.summaries()  # verified: a forged or planted record must not make an ID look forgotten
    # nothing forgotten yet: do not create the audit key just to look (input checks and --dry-run must leave the
    # project untouched)
    keys = audit_keys(root, params, log) if records else []
    listed = [[r["request_id"], r["audit_key_id"], r["forgotten_ids"]] for r in records]
    head = hashlib.sha256(json.dumps([listed, sorted(map(audit_key_id, keys))]).encode()).hexdigest()
    if not records:
        return Forgotten(lambda sample_ids: {}, head)
    return Forgotten(forgotten_by(records, keys), head)  # each record under the audit key it names


def keys_note(root: Path, params: dict[str, Any]) -> str | None:
    """The note a forget ends with while the audit keys sit inside the project folder (a project made before the
    per-user key dir): how to move them."""
    return in_project_note(root, params)


def write_records(root: Path, journal: Any, plan: Any, measured: dict[str, Any], params: dict[str, Any]) -> str:
    """Append one signed record per request of the batch ``journal`` (a forget's journal: its requests and
    results; ``plan``: what the batch touched) and return the new checkpoint, anchored where params say.

    ``measured``: ``before``/``after`` (artifact path -> digest), ``dvc_lock`` before/after, ``completed_purges``
    (pending purges of earlier requests finished since the last record), ``times`` (request -> received, deadline,
    quarantined, retrained, purged). The records name the packaged model and the adapters as their in-toto
    subjects (``subjects``). A request already in the log (written before a crash that lost the state change) is
    not written again.
    """
    log = audit_log(root, params, memo=True)
    hmac_key = audit_key(root, params, log)
    signing = signing_key(root, params, log)  # pins its fingerprint in the key dir when it is created
    log = audit_log(root, params, memo=True)  # trust as it stands after a first-use pin
    before, after = measured["before"], measured["after"]
    shared = {
        "batch_request_ids": journal.request_ids,
        "audit_key_id": audit_key_id(hmac_key),
        # keyed: an unkeyed digest of a manifest would confirm a guess of its (few, guessable) sample IDs
        "manifest_hmac": {r: id_digest(hmac_key, f"manifest:{d}") for r, d in journal.manifest_digests.items()},
        "status": plan.status,
        "affected": {"partitions": plan.partitions, "test_samples": len(plan.test_ids),
                     "train_samples": len(plan.train_ids)},
        # changed artifacts; the adapter files only as Merkle roots, the retrained adapters sealed (they would
        # point at the forgotten sample): pipeline.audit.disclosure
        **changes(hmac_key, before, after, plan.adapters, _quality(root)),
        "dvc_lock": measured["dvc_lock"],
        "code_revision": git_revision(root),
        "params_sha256": params_digest(root),
        "registry": journal.results.get("registry", {}),
        "stages_run": journal.results.get("stages_run", []),
        "checks": journal.results.get("checks", []),
        "purge": journal.results.get("purge", {}),
        "completed_purges": measured["completed_purges"],
        "timings_seconds": journal.timings,
        "platform": platform_tags(),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    removed = set(plan.train_ids) | set(plan.test_ids)
    recorded = recorded_requests(root, params)
    named = subjects(root)
    for request_id, sample_ids in journal.request_samples.items():
        if request_id in recorded:
            continue
        own = set(sample_ids)
        predicate = {**shared, "request_id": request_id, "times": measured["times"][request_id],
                     "sealed": seal(hmac_key, journal.request_meta[request_id]),  # reason, received_at, quarantine
                     "forgotten_ids": _digests(hmac_key, own & removed),
                     "already_forgotten_ids": _digests(hmac_key, own & set(plan.already_forgotten)),
                     "not_present_ids": _digests(hmac_key, own & set(plan.unknown_ids))}
        log.append(predicate, named, signing)
    note = log.checkpoint(origin(log, hmac_key), signing)
    anchor(root, params, note)
    return note


def _quality(root: Path) -> dict[str, Any]:
    """The quality checkpoint of the build this forget produced: its result file's sha256, pass/fail, failures."""
    path = root / RESULT
    result = read_result(path)
    return {"result": RESULT.as_posix(), "result_sha256": file_sha256(path) if path.is_file() else None,
            "passed": bool(result["success"]), "failed_expectations": result["failed"]}


def _digests(key: bytes, sample_ids: set[str]) -> list[str]:
    return sorted(id_digest(key, i) for i in sample_ids)


def subjects(root: Path) -> dict[str, str]:
    """The in-toto subjects: every file of the packaged model and every adapter, by sha256 (the adapter files as
    one Merkle root: ``disclosure.subjects``)."""
    files = sorted(p for d in ("models/package", "models/adapters") for p in (root / d).rglob("*") if p.is_file())
    return disclosure.subjects({p.relative_to(root).as_posix(): file_sha256(p) for p in files})
