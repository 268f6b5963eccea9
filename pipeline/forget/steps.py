"""`legonet forget MANIFEST...`: apply deletion requests through the journalled flow of pipeline.forget.flow.

Steps (docs/design.md section 5), one per state of the journal (``_run`` holds the table): quarantine the adapters
the requests activate (pipeline.forget.requests) -> remove the rows -> rebuild
the stages DVC's graph puts downstream of them -> register -> purge -> write the signed audit record -> commit to
git. Re-running the same command after a crash finishes the job. A purge a store refuses does not stop the forget:
it is kept as pending (pipeline.purge.pending), which every later forget retries first.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.audit.record import forgotten_lookup, recorded_requests, write_records
from pipeline.errors import StoreError
from pipeline.forget import flow
from pipeline.forget.requests import (
    JOURNAL,
    DeletionRequest,
    Journal,
    check_deadlines,
    drop,
    load_manifest,
    now,
    quarantine,
    stamp,
    times,
)
from pipeline.purge import pending
from pipeline.runner.build import (
    commit_project,
    dvc_add,
    dvc_status,
    estimate_seconds,
    repro,
    rerun,
    tag_checkpoint,
    tag_forget,
)
from pipeline.runner.worker import StageWorker, call, entry_modules, stage_worker, worker_modules

TIMED = ("rebuilt", "purged")  # states whose time the record carries (as "retrained", "purged")


def forget(root: Path, manifests: Sequence[Path], params: dict[str, Any], *, dry_run: bool = False,
           wait: bool = True, allow_unknown: bool | None = None, say: Callable[[str], None] = print,
           skip_recorded: bool = False) -> dict[str, Any]:
    """Apply the requests in ``manifests`` as one batch (one rebuild for the union); return a summary.
    ``skip_recorded``: leave out requests the audit log already records (a batch of deferred requests, some of
    which a plain `legonet forget` has done since) instead of refusing the batch."""
    started = time.monotonic()
    requests = [load_manifest(m) for m in manifests]  # all parsing errors surface before anything else
    if allow_unknown is None:
        allow_unknown = bool(params.get("audit", {}).get("allow_unknown_ids", False))
    timings: dict[str, float] = {"validate": round(time.monotonic() - started, 3)}
    if dry_run:
        return _dry_run(root, requests, params, say)
    lock_started = time.monotonic()
    # the stages that declare a preload (quality, package) and the MLflow steps (registry, purge of model versions,
    # checkpoint tag) run in a second process that imports GX and MLflow meanwhile, then every other stage module
    # (torch for training), so that it can take any stage while idle; with Ray there is no worker: `dvc repro` runs
    # every stage, and the MLflow steps run here
    modules = worker_modules(root)
    preload = ["pipeline.purge.models", *sorted(entry_modules(root) - modules)]
    with flow.project_lock(root, wait, say), flow.Writer(root, params) as writer, \
            stage_worker(root, params, modules, preload=preload) as worker:
        timings["lock"] = round(time.monotonic() - lock_started, 3)
        flow.preconditions(root, params)
        interrupted = Journal.load(root)
        if interrupted is not None or pending.load(root)["pending"]:
            writer.hold()  # finishing an earlier forget or purge writes to the shared stores
        pending.retry(root, params, worker, say, skip=interrupted.request_ids if interrupted else ())
        check_deadlines(root, say)
        if interrupted is not None and interrupted.batch != flow.batch_id(requests):
            say(f"finishing the interrupted forget of {', '.join(interrupted.request_ids)} first")
            _run(root, interrupted, params, worker, say, resumed=True)  # a refused purge stays pending
            interrupted = None
        if interrupted is None:
            plan_started = time.monotonic()
            journal = _start(root, requests, params, allow_unknown, modules, say, skip_recorded)
            if journal is None:
                return {"status": "already-forgotten", "request_ids": [r.request_id for r in requests]}
            journal.timings.update(timings, plan=round(time.monotonic() - plan_started, 3))
            resumed = False
        else:
            say(f"resuming the forget of {', '.join(interrupted.request_ids)} from state '{interrupted.state}'")
            journal, resumed = interrupted, True
        writer.hold()  # the request is valid: from here on the forget writes
        summary = _run(root, journal, params, worker, say, resumed)
    if "purge_pending" in summary:
        raise StoreError(f"the forget of {', '.join(summary['request_ids'])} is done and recorded, but its purge is "
                         f"recorded as pending ({summary['purge_pending']}); the next `legonet forget` retries it "
                         "(`legonet audit verify` reports it until then)")
    return summary


def _run(root: Path, journal: Journal, params: dict[str, Any], worker: StageWorker | None,
         say: Callable[[str], None], resumed: bool) -> dict[str, Any]:
    """Take the journal from its state to the last one, one step per state, each recorded durably when done."""
    plan = flow.plan_of(journal)
    ids = set(journal.sample_ids)
    steps: dict[str, Callable[[], None]] = {  # the state a step reaches -> the step
        "quarantined": lambda: quarantine(root, journal, params, say),
        "data-removed": lambda: remove(root, plan, ids, say),
        "rebuilt": lambda: rebuild(root, journal, plan, ids, worker, say, resumed),
        "registered": lambda: register(root, journal, plan, params["mlflow"], worker, say),
        "purged": lambda: purge(root, journal, plan, ids, params, worker, say),
        "audited": lambda: audit(root, journal, plan, params, worker, say, resumed),
        "committed": lambda: commit(root, journal.request_ids),
    }
    for state in flow.STATES[flow.STATES.index(journal.state) + 1:]:
        started = time.monotonic()
        steps[state]()
        if state in TIMED and plan.changes_data:  # when the request was retrained, purged: for the record
            journal.results.setdefault("times", {})[state] = stamp(now())
        flow.advance(journal, root, state, started)
    refused = journal.results.get("purge", {}).get("status") == "pending"
    summary = {"status": plan.status, **({"purge_pending": journal.results["purge"]["reason"]} if refused else {}),
               "request_ids": journal.request_ids, "retrained_adapters": plan.adapters,
               "timings": journal.timings, **journal.results.get("registry", {})}
    drop(root, journal.request_ids)  # their stored manifests hold raw IDs too; before the journal goes,
    (root / JOURNAL).unlink()  # so a crash between the two is finished by re-running (the record is written)
    return summary


def _start(root: Path, requests: Sequence[DeletionRequest], params: dict[str, Any], allow_unknown: bool,
           modules: frozenset[str], say: Callable[[str], None], skip_recorded: bool = False) -> Journal | None:
    recorded = recorded_requests(root, params)  # verified first
    if skip_recorded and any(r.request_id not in recorded for r in requests):
        requests = [r for r in requests if r.request_id not in recorded]
    done = [r.request_id for r in requests if r.request_id in recorded]
    if done and len(done) == len(requests):
        say(f"request(s) {', '.join(done)} already forgotten (see `legonet audit show {done[0]}`); nothing to do")
        return None
    if done:
        raise flow.ForgetError(f"request(s) {', '.join(done)} are already in the audit log; "
                               "run them separately from the new requests")
    plan = flow.plan_requests(root, requests, params, forgotten_lookup(root, params), modules, allow_unknown)
    journal = flow.new_journal(requests, plan)
    journal.before = flow.measure(root, clean=plan.changes_data, outputs=True)  # `dvc status` just checked
    journal.save(root)
    return journal


def remove(root: Path, plan: flow.Plan, ids: set[str], say: Callable[[str], None]) -> None:
    files = flow.remove_rows(root, plan, ids) if plan.changes_data else []
    if files:
        dvc_add(root, files)
    say(f"removed {len(plan.train_ids)} train and {len(plan.test_ids)} test samples from {len(files)} file(s)")


def rebuild(root: Path, journal: Journal, plan: flow.Plan, ids: set[str], worker: StageWorker | None,
            say: Callable[[str], None], resumed: bool) -> None:
    if not plan.changes_data:
        journal.results["checks"] = []
        return
    if worker is not None:  # local: the plan's stages in this process (and the worker), then `dvc commit`
        stale = rerun(root, plan.stages, worker, timings=journal.timings)
        ran, checked = list(plan.stages), None
    else:  # Ray: `dvc repro`, which starts one local Ray for all its stage processes
        ran = repro(root, timings=journal.timings, total=len(plan.stages))
        stale, checked = dvc_status(root, stamp=True), None if resumed else ran
    journal.results["stages_run"] = ran
    say(f"retrained adapters {plan.adapters} ({len(ran)} stages)")
    journal.results["checks"] = flow.check_rebuild(root, plan, journal.before["artifacts"], checked, ids, stale)


def register(root: Path, journal: Journal, plan: flow.Plan, settings: dict[str, Any],
             worker: StageWorker | None, say: Callable[[str], None]) -> None:
    if not plan.changes_data:
        return
    registry = call(worker, tag_forget, root, settings, journal.request_ids)
    journal.results["registry"] = registry
    say(f"model version {registry['model_version']} @{','.join(registry['aliases']) or '-'}: "
        f"{registry['gate_reason']}")


def purge(root: Path, journal: Journal, plan: flow.Plan, ids: set[str], params: dict[str, Any],
          worker: StageWorker | None, say: Callable[[str], None]) -> None:
    if not plan.changes_data:
        journal.results["purge"] = {}
        return

    def saved(progress: dict[str, Any]) -> None:
        journal.results.update(progress)
        journal.save(root)

    progress = {k: journal.results[k] for k in ("doomed_objects", "mlflow_plan") if k in journal.results}
    journal.results["purge"] = pending.purge_request(
        root, journal.request_ids, sorted(set(journal.before["outputs"].values())),
        journal.results.get("registry", {}), progress, ids, params, worker, saved, say)


def audit(root: Path, journal: Journal, plan: flow.Plan, params: dict[str, Any], worker: StageWorker | None,
          say: Callable[[str], None], resumed: bool) -> None:
    completed = pending.completed(root)
    # per file (an adapter block is one directory output in dvc.lock); the rebuild left `dvc status` clean, which
    # a resumed forget cannot vouch for
    after = flow.measure(root, clean=plan.changes_data and not resumed)
    measured = {"before": journal.before["artifacts"], "after": after["artifacts"],
                "dvc_lock": {"before": journal.before["dvc_lock"], "after": after["dvc_lock"]},
                "completed_purges": completed,
                "times": {r: times(journal, r, params) for r in journal.request_ids}}
    note = write_records(root, journal, plan, measured, params)
    flow.mark_clean(root, forgotten_lookup(root, params).head, after["artifacts"])
    pending.recorded(root, completed)
    version = journal.results.get("registry", {}).get("model_version")
    if version is not None:
        call(worker, tag_checkpoint, root, params["mlflow"], version, note)
    say(f"audit checkpoint (keep it: `legonet audit verify --checkpoint FILE` proves later logs extend it):\n{note}")


def commit(root: Path, request_ids: list[str]) -> None:
    """Commit everything the forget changed (dvc.lock, .dvc files, params, metrics, the audit log) to git."""
    try:
        commit_project(root, f"legonet forget {', '.join(request_ids)}")
    except subprocess.CalledProcessError as exc:  # e.g. a pre-commit hook: the audit record is not committed
        output = (exc.stderr or exc.stdout or b"").decode(errors="replace").strip()
        raise flow.ForgetError(f"`git commit` of the forget failed: {output[-500:]}; "
                               "fix the cause and re-run the same command to finish (the record is written)"
                               ) from exc


def _dry_run(root: Path, requests: Sequence[DeletionRequest], params: dict[str, Any], say: Callable[[str], None]
             ) -> dict[str, Any]:
    plan = flow.plan_requests(root, requests, params, forgotten_lookup(root, params), worker_modules(root),
                              allow_unknown=True, dry_run=True)
    estimate = estimate_seconds(root, params, plan.stages)
    say(f"would forget {len(plan.train_ids)} train and {len(plan.test_ids)} test samples "
        f"({len(plan.unknown_ids)} unknown, {len(plan.already_forgotten)} already forgotten)")
    say(f"partitions: {plan.partitions}; adapters retrained: {plan.adapters}")
    say(f"stages: {' '.join(plan.stages) or '(none)'}")
    say(f"expected compute: ~{estimate:.0f} s (from the last recorded duration of each stage)")
    return {"status": "dry-run", "stages": plan.stages, "adapters": plan.adapters, "estimate_seconds": estimate}
