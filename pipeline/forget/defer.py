"""`legonet forget --defer` and `legonet requests run`: accept requests now (validate, keep, quarantine), retrain
them later in one batch through the journalled forget (pipeline.forget.steps), each before its deadline.

Deferring is all or nothing for the manifests given: every one is validated and planned before any is kept, and a
crash after some are kept leaves them ``received``: the quarantine covers them from the next command that publishes
(every publish covers all held requests), and re-running the same `legonet forget --defer` finishes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pipeline.audit.record import forgotten_lookup, recorded_requests
from pipeline.errors import ForgetError
from pipeline.forget import flow
from pipeline.forget.requests import (
    Journal,
    check_deadlines,
    drop,
    held,
    load_manifest,
    now,
    pending,
    refuse_late,
    save,
    stamp,
    store,
)
from pipeline.forget.steps import forget
from pipeline.tracking.quarantine import publish

STORED = "defer-stored"  # the crash point between keeping the requests and publishing their quarantine


def defer(root: Path, manifests: Sequence[Path], params: dict[str, Any], *, wait: bool = True,
          allow_unknown: bool | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate and keep the requests, then publish the quarantine of every held request; return a summary."""
    requests = [load_manifest(m) for m in manifests]  # all parsing errors surface before anything else
    if allow_unknown is None:
        allow_unknown = bool(params.get("audit", {}).get("allow_unknown_ids", False))
    at = now()
    with flow.project_lock(root, wait, say), flow.Writer(root, params) as writer:
        flow.preconditions(root, params)
        journal = Journal.load(root)
        if journal is not None:  # its rows may be half removed: plans made now would not hold
            raise ForgetError(f"the forget of {', '.join(journal.request_ids)} was interrupted; finish it first "
                              "(re-run that `legonet forget`, or `legonet requests run`), then defer")
        recorded = recorded_requests(root, params)
        kept = {d.request_id: d for d in pending(root, clean=True)}
        items, new = [], []
        for request in requests:
            if request.request_id in recorded:
                say(f"request {request.request_id} is already forgotten (`legonet audit show {request.request_id}`)")
            elif (known := kept.get(request.request_id)) is not None:
                if known.digest != request.digest:
                    raise ForgetError(f"{request.source}: request {request.request_id} is already deferred with "
                                      "another manifest; give this one another request_id")
                items.append(known)  # re-run after a crash, or a repeat: finish its quarantine
            else:
                refuse_late(request, params, at)
                new.append(request)
        forgotten = forgotten_lookup(root, params)
        plans = [flow.rows_plan(root, [r], params, forgotten) for r in new]  # every check before anything is kept
        unknown = [i for plan in plans for i in plan.unknown_ids]
        if unknown and not allow_unknown:
            raise ForgetError(f"{len(unknown)} sample ID(s) are not in this project: {unknown[:5]}; check the "
                              "manifest, or pass --allow-unknown to record them as 'not present'")
        writer.hold()  # every request is valid: from here on the command writes
        items += [store(root, r, p.adapters, params, allow_unknown) for r, p in zip(new, plans, strict=True)]
        flow.crash_point(STORED)
        adapters, holding = held(root)
        versions = publish(root, params["mlflow"], adapters, holding, stamp(at)) if adapters else {}
        for item in items:
            if item.state == "received":
                item.state, item.quarantined_at = "quarantined", stamp(now())
                save(root, item)
        check_deadlines(root, say)
    if versions:
        say(f"quarantined adapters {adapters} in model version(s) {', '.join(versions)}")
    return {"status": "deferred", "request_ids": [i.request_id for i in items], "quarantined_adapters": adapters,
            "model_versions": sorted(versions, key=int), "deadlines": {i.request_id: i.deadline for i in items}}


def run_pending(root: Path, params: dict[str, Any], *, due_within: timedelta | None = None, wait: bool = True,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """Forget every deferred request in one rebuild (``due_within``: only when one is due within that time; then
    all of them, since the rebuild costs little more). A request the audit log records already is dropped."""
    recorded = recorded_requests(root, params)
    items = pending(root)
    drop(root, [d.request_id for d in items if d.request_id in recorded])
    items = [d for d in items if d.request_id not in recorded]
    if not items:
        say("no deferred request is pending")
        return {"status": "nothing-pending", "request_ids": []}
    at = now()
    if due_within is not None and not any(d.due(at, due_within) for d in items):
        say(f"{len(items)} deferred request(s) pending, none due within {due_within}: nothing to run yet "
            f"(the first is due {items[0].deadline})")
        return {"status": "nothing-due", "request_ids": [d.request_id for d in items]}
    say(f"forgetting {len(items)} deferred request(s) in one rebuild: {', '.join(d.request_id for d in items)}")
    return forget(root, [root / d.manifest for d in items], params, wait=wait,
                  allow_unknown=any(d.allow_unknown for d in items), say=say, skip_recorded=True)
