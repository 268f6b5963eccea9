"""Purges a store refused (a legal hold, an object lock, a store that stays down), kept until a later forget
finishes them (docs/remote-stores.md, "When a store refuses the purge").

One refusing store must not stop every later forget, and a forget's journal (raw sample IDs) must not outlive the
forget. So a purge that meets a ``StoreError`` is recorded here, the forget goes on (its audit record says the
purge is pending, with the reason) and its journal is deleted. The file (``.legonet/``, owner-only, outside git)
holds no raw ID: what is still to do is the DVC objects by digest, or, when finding them needed the store that
refused, the forgotten IDs keyed under the object memo's local secret (``ObjectIndex.id_digests``, what
``pipeline.purge.history`` needs); and the MLflow plan by ID, or what makes it. Every later `legonet forget` retries
each pending purge first: one that succeeds moves to ``completed`` until the next audit record lists it, one that
still fails stays and the forget goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.project.layout import STATE_DIR
from pipeline.project.scratch import write_private
from pipeline.purge import history
from pipeline.purge import models as model_purge
from pipeline.purge import objects as purge
from pipeline.runner.worker import call
from pipeline.tracking.identity import project_id

PENDING = STATE_DIR / "pending-purges.json"
Say = Callable[[str], None]
# what a purge needs besides the project: fixed when the forget first tries it
TASK_FIELDS = ("request_ids", "before", "keep_version", "retain_until")
# what it works out on the way, kept as soon as known so that a retry reuses it
PROGRESS_FIELDS = ("keyed_ids", "doomed_objects", "mlflow_plan")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load(root: Path) -> dict[str, list[dict[str, Any]]]:
    """``pending``: the purges still to do; ``completed``: those finished and not yet listed by an audit record."""
    path = root / PENDING
    state = json.loads(path.read_text()) if path.is_file() else {}
    return {"pending": state.get("pending", []), "completed": state.get("completed", [])}


def save(root: Path, state: dict[str, list[dict[str, Any]]]) -> None:
    """Atomically and privately, like the journal (a crash leaves the old file or the new one)."""
    write_private(root / PENDING, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())


def one_line(exc: StoreError) -> str:
    """The reason a store gave, as the one line the record and the command's message carry."""
    return " ".join(str(exc).split())


def keyed(root: Path, sample_ids: set[str]) -> list[str]:
    """The forgotten IDs as the object memo keys them (hex): enough to find their objects, not to name them."""
    return sorted(d.hex() for d in history.ObjectIndex(root, None).id_digests(sample_ids))


def purge_request(root: Path, request_ids: list[str], before: list[str], registry: dict[str, Any],
                  progress: dict[str, Any], sample_ids: set[str], params: dict[str, Any], worker: Any,
                  saved: Callable[[dict[str, Any]], None], say: Say) -> dict[str, Any]:
    """The forget's purge (docs/design.md section 10): what the forgotten ``sample_ids`` produced, found from the
    outputs ``before`` the forget and the project's history, from every DVC store and MLflow, keeping the forget's
    own model version (``registry``). Returns the audit record's purge section. ``progress`` holds what an earlier
    try of the same forget worked out (``PROGRESS_FIELDS``); ``saved(progress)`` keeps what this one works out, as
    soon as known. A store that cannot be reached or refuses does not stop the forget: what is left is recorded as
    pending (no raw ID) and the next `legonet forget` retries it."""
    retention = int(params.get("purge", {}).get("retention_days", 0))
    until = (datetime.now(UTC) + timedelta(days=retention)).date().isoformat() if retention > 0 else None
    task = {"request_ids": request_ids, "before": before, "keep_version": registry.get("model_version"),
            "retain_until": until, **progress}
    if "doomed_objects" not in task:
        task["keyed_ids"] = keyed(root, sample_ids)
    try:
        result = run_purge(root, task, params, worker,
                           lambda: saved({k: task[k] for k in ("doomed_objects", "mlflow_plan") if k in task}))
    except StoreError as exc:
        say("a store refused the purge: recorded as pending, the forget goes on")
        return record(root, task, one_line(exc))
    dropped(root, request_ids)  # a resumed forget whose first try was recorded as pending
    if retention == 0 and "champion" not in registry.get("aliases", []):
        say("no version is champion now: the previous champion was trained on the forgotten samples and is purged; "
            "the new version stays candidate until a build passes the gate")
    say(f"purged {sum(v['deleted_objects'] for v in result['dvc'].values())} DVC object(s) from "
        f"{len(result['dvc'])} store(s), {len(result['mlflow'].get('deleted_model_versions', []))} model version(s)")
    return result


def run_purge(root: Path, task: dict[str, Any], params: dict[str, Any], worker: Any, saved: Callable[[], None]
              ) -> dict[str, Any]:
    """Purge what ``task`` says (``TASK_FIELDS``, and the ``PROGRESS_FIELDS`` known so far) from every DVC store
    and MLflow; return what the audit record says was purged. Raises StoreError when a store cannot be reached or
    refuses; ``saved()`` is called each time the task learns something a retry must not compute again (the DVC
    objects are found before any store is changed, the MLflow objects before any is deleted)."""
    settings = params["mlflow"]
    destination = settings.get("artifacts_destination", "")
    if "doomed_objects" not in task:  # kept: a retry finds the objects gone from the stores
        task["doomed_objects"] = history.plan_keyed_purge(root, {bytes.fromhex(d) for d in task["keyed_ids"]},
                                                          task["before"])
        task.pop("keyed_ids")  # the objects are named now: their IDs, even keyed, are no longer needed
        saved()
    purge.check_stores(root, settings["tracking_uri"], destination)  # before deleting anything anywhere
    pushed = purge.push_remotes(root)
    doomed = task["doomed_objects"]
    objects = purge.purge_objects(root, doomed, purge.referenced_objects(root, purge.dvc_cache(root)))
    history.purged(root, doomed, task["request_ids"])
    backend = settings.get("backend_store_uri") or settings["tracking_uri"]
    if "mlflow_plan" not in task:  # every MLflow object to delete, named before any is deleted
        plan = call(worker, model_purge.plan_purge, settings["tracking_uri"], settings["registered_model"],
                    project_id(params), task["keep_version"], task["retain_until"])
        task["mlflow_plan"] = _without_later_versions(plan, settings["registered_model"], task["keep_version"])
        saved()
    models = call(worker, model_purge.purge_models, settings["tracking_uri"], task["mlflow_plan"],
                  task["request_ids"], root / "mlartifacts" / "models", backend, artifacts_destination=destination)
    if backend != settings["tracking_uri"]:  # a server deleted the rows; this process's deletes are zeroed
        model_purge.vacuum_sqlite(backend)
    return {"dvc": objects, "dvc_doomed": purge.summarise(doomed), "dvc_pushed_to": pushed, "mlflow": models}


def _without_later_versions(plan: dict[str, Any], name: str, keep_version: str | None) -> dict[str, Any]:
    """The plan without the versions of ``name`` registered after ``keep_version`` (the forget's own version): a
    purge finished by a later command must not delete what builds trained after the forget, without the data."""
    if keep_version is None:
        return plan
    later = [i for i in plan["delete"] if i["name"] == name and int(i["version"]) > int(keep_version)]
    return {**plan, "delete": [i for i in plan["delete"] if i not in later]}


def record(root: Path, task: dict[str, Any], reason: str) -> dict[str, Any]:
    """Keep ``task`` as pending (replacing an earlier entry of the same requests, whose ``since`` stays); return
    what the audit record's purge section says."""
    state = load(root)
    earlier = [e for e in state["pending"] if e["request_ids"] == task["request_ids"]]
    since = earlier[0]["since"] if earlier else now()
    entry = {**{k: task[k] for k in (*TASK_FIELDS, *PROGRESS_FIELDS) if k in task},
             "reason": reason, "since": since, "tried": now()}
    state["pending"] = [e for e in state["pending"] if e["request_ids"] != task["request_ids"]] + [entry]
    save(root, state)
    return {"status": "pending", "reason": reason, "pending_since": since}


def retry(root: Path, params: dict[str, Any], worker: Any, say: Say, skip: Iterable[str] = ()) -> None:
    """Retry every pending purge (but those of the requests in ``skip``, which a resumed journal finishes itself):
    one that succeeds moves to ``completed``, one a store still refuses stays pending, with the new reason."""
    state = load(root)
    for entry in [e for e in state["pending"] if not set(e["request_ids"]) & set(skip)]:
        requests = ", ".join(entry["request_ids"])
        try:
            result = run_purge(root, entry, params, worker, lambda: save(root, state))
        except StoreError as exc:
            entry.update(reason=one_line(exc), tried=now())
            save(root, state)
            say(f"the purge of request(s) {requests} (pending since {entry['since']}) is still refused: "
                f"{entry['reason']}; it stays pending, and this forget goes on")
            continue
        state["pending"].remove(entry)
        state["completed"].append({"request_ids": entry["request_ids"], "pending_since": entry["since"],
                                   "completed_at": now(), "purge": result})
        save(root, state)
        say(f"finished the pending purge of request(s) {requests} (pending since {entry['since']}); "
            "this forget's audit record lists it")


def completed(root: Path) -> list[dict[str, Any]]:
    """The finished purges no audit record lists yet: what the next record's ``completed_purges`` says."""
    return load(root)["completed"]


def recorded(root: Path, entries: list[dict[str, Any]]) -> None:
    """Drop ``entries`` from ``completed``: an audit record lists them now."""
    state = load(root)
    state["completed"] = [e for e in state["completed"] if e not in entries]
    save(root, state)


def dropped(root: Path, request_ids: list[str]) -> None:
    """Drop the pending entry of ``request_ids``: their own forget, resumed, has just finished the purge."""
    state = load(root)
    if any(e["request_ids"] == request_ids for e in state["pending"]):
        state["pending"] = [e for e in state["pending"] if e["request_ids"] != request_ids]
        save(root, state)


def outstanding(root: Path, records: list[dict[str, Any]]) -> list[str]:
    """`legonet audit verify`: each request whose record says its purge is pending and that no later record lists
    as completed; one finished since the last record says so (the next forget's record lists it)."""
    done = {r for record in records for item in record["predicate"].get("completed_purges", [])
            for r in item["request_ids"]}
    finished = {r for item in completed(root) for r in item["request_ids"]}
    lines = []
    for record in records:
        predicate = record["predicate"]
        purge, request = predicate.get("purge", {}), predicate["request_id"]
        if purge.get("status") == "pending" and request not in done:
            note = " (finished since: the next `legonet forget` records it)" if request in finished else ""
            lines.append(f"purge of request {request} pending since {purge['pending_since']}: {purge['reason']}{note}")
    return lines
