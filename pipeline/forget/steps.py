"""`legonet forget MANIFEST...`: apply deletion requests through the journalled flow of pipeline.forget.flow.

Steps (docs/design.md section 5), one per state of the journal (``_run`` holds the table): remove the rows -> rebuild
the stages DVC's graph puts downstream of them -> register -> purge -> write the signed audit record -> commit to
git. Re-running the same command after a crash finishes the job. A purge a store refuses does not stop the forget:
it is kept as pending (pipeline.purge.pending), which every later forget retries first.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.audit.disclosure import changes
from pipeline.audit.keyring import anchor, audit_key, audit_log, origin, signing_key
from pipeline.audit.secrets import audit_key_id, id_digest, seal
from pipeline.data.dataset import read_table
from pipeline.data.salt import data_secret
from pipeline.errors import StoreError
from pipeline.forget import flow
from pipeline.forget.manifest import DeletionRequest, load_manifest, merge_requests
from pipeline.project.code import check_all_code
from pipeline.project.layout import REFERENCE
from pipeline.project.params import commit_project, params_digest
from pipeline.purge import pending
from pipeline.runner.build import (
    dvc_add,
    dvc_lock_digest,
    dvc_repo,
    dvc_status,
    repro,
    rerun,
    tag_checkpoint,
    tag_forget,
)
from pipeline.runner.executor import executor_of
from pipeline.runner.worker import StageWorker, call, stage_worker, worker_modules
from pipeline.tracking.head import check_head
from pipeline.tracking.identity import project_id
from pipeline.tracking.lineage import file_sha256, git_revision, platform_tags
from pipeline.tracking.registry import project_store


def forget(root: Path, manifests: Sequence[Path], params: dict[str, Any], *, dry_run: bool = False,
           wait: bool = True, allow_unknown: bool | None = None, say: Callable[[str], None] = print
           ) -> dict[str, Any]:
    """Apply the requests in ``manifests`` as one batch (one rebuild for the union); return a summary."""
    started = time.monotonic()
    requests = [load_manifest(m) for m in manifests]  # all parsing errors surface before anything else
    project_id(params)  # a project without its ID could not purge its MLflow objects: refuse before any change
    data_secret(root)  # nor could one without its data secret write its tables (pipeline.data.salt)
    if allow_unknown is None:
        allow_unknown = bool(params.get("audit", {}).get("allow_unknown_ids", False))
    timings: dict[str, float] = {"validate": round(time.monotonic() - started, 3)}
    if dry_run:
        return _dry_run(root, requests, params, say)
    lock_started = time.monotonic()
    # the stages that declare a preload (quality, package) and the MLflow
    # steps (registry, purge of model versions, checkpoint tag) run in a second process that imports GX and MLflow
    # meanwhile (Ray runs every stage under `dvc repro` instead, and the MLflow steps here)
    executor, modules = executor_of(params), worker_modules(root)
    with flow.project_lock(root, wait, say), \
            stage_worker(root, modules if executor == "local" else None, preload=["pipeline.purge.models"]) as worker:
        timings["lock"] = round(time.monotonic() - lock_started, 3)
        check_head(root, params, project_store(params["mlflow"]))  # another clone forgot since this one pulled?
        interrupted = flow.Journal.load(root)
        pending.retry(root, params, worker, say, skip=interrupted.request_ids if interrupted else ())
        if interrupted is not None and interrupted.batch != flow.batch_id(requests):
            say(f"finishing the interrupted forget of {', '.join(interrupted.request_ids)} first")
            _run(root, interrupted, params, executor, worker, say, resumed=True)  # a refused purge stays pending
            interrupted = None
        if interrupted is None:
            plan_started = time.monotonic()
            journal = _start(root, requests, params, allow_unknown, modules, say)
            if journal is None:
                return {"status": "already-forgotten", "request_ids": [r.request_id for r in requests]}
            journal.timings.update(timings, plan=round(time.monotonic() - plan_started, 3))
            resumed = False
        else:
            say(f"resuming the forget of {', '.join(interrupted.request_ids)} from state '{interrupted.state}'")
            journal, resumed = interrupted, True
        summary = _run(root, journal, params, executor, worker, say, resumed)
    if "purge_pending" in summary:
        raise StoreError(f"the forget of {', '.join(summary['request_ids'])} is done and recorded, but its purge is "
                         f"recorded as pending ({summary['purge_pending']}); the next `legonet forget` retries it "
                         "(`legonet audit verify` reports it until then)")
    return summary


def _run(root: Path, journal: flow.Journal, params: dict[str, Any], executor: str, worker: StageWorker | None,
         say: Callable[[str], None], resumed: bool) -> dict[str, Any]:
    """Take the journal from its state to the last one, one step per state, each recorded durably when done."""
    plan = flow.plan_of(journal)
    ids = set(journal.sample_ids)
    steps: dict[str, Callable[[], None]] = {  # the state a step reaches -> the step
        "data-removed": lambda: remove(root, plan, ids, say),
        "rebuilt": lambda: rebuild(root, journal, plan, ids, executor, worker, say, resumed),
        "registered": lambda: register(root, journal, plan, params["mlflow"], worker, say),
        "purged": lambda: purge(root, journal, plan, ids, params, worker, say),
        "audited": lambda: audit(root, journal, plan, params, worker, say, resumed),
        "committed": lambda: commit(root, journal.request_ids),
    }
    for state in flow.STATES[flow.STATES.index(journal.state) + 1:]:
        started = time.monotonic()
        steps[state]()
        flow.advance(journal, root, state, started)
    refused = journal.results.get("purge", {}).get("status") == "pending"
    summary = {"status": plan.status, **({"purge_pending": journal.results["purge"]["reason"]} if refused else {}),
               "request_ids": journal.request_ids, "retrained_adapters": plan.adapters,
               "timings": journal.timings, **journal.results.get("registry", {})}
    (root / flow.JOURNAL).unlink()  # holds raw IDs: gone once the record is written
    return summary


def _forgotten(root: Path, params: dict[str, Any]) -> Callable[[Iterable[str]], dict[str, list[str]]]:
    """ids -> {id: the requests that forgot it} for the IDs the audit log lists as forgotten."""
    log = audit_log(root, params, memo=True)
    records = log.summaries()  # verified: a forged or planted record must not make an ID look forgotten
    if not records:  # nothing forgotten yet: do not create the audit key just to look (input checks and
        return lambda sample_ids: {}  # --dry-run must leave the project untouched)
    key = audit_key(root, params, log)
    owners: dict[str, list[str]] = {}
    for record in records:
        for digest in record["forgotten_ids"]:
            owners.setdefault(digest, []).append(record["request_id"])
    return lambda sample_ids: {i: found for i in sample_ids if (found := owners.get(id_digest(key, i)))}


def _plan(root: Path, requests: Sequence[DeletionRequest], params: dict[str, Any]) -> flow.Plan:
    reference = set(read_table(root / REFERENCE)["sample_id"])
    return flow.plan_batch(root, merge_requests(requests), reference, _forgotten(root, params),
                           int(params["adapters"]["n"]), int(params["adapters"]["blocks"]))


def _start(root: Path, requests: Sequence[DeletionRequest], params: dict[str, Any], allow_unknown: bool,
           modules: frozenset[str], say: Callable[[str], None]) -> flow.Journal | None:
    recorded = {r["request_id"] for r in audit_log(root, params, memo=True).summaries()}  # verified first
    done = [r.request_id for r in requests if r.request_id in recorded]
    if done and len(done) == len(requests):
        say(f"request(s) {', '.join(done)} already forgotten (see `legonet audit show {done[0]}`); nothing to do")
        return None
    if done:
        raise flow.ForgetError(f"request(s) {', '.join(done)} are already in the audit log; "
                               "run them separately from the new requests")
    plan = _plan(root, requests, params)
    if plan.unknown_ids and not allow_unknown:
        raise flow.ForgetError(
            f"{len(plan.unknown_ids)} sample ID(s) are not in this project: {plan.unknown_ids[:5]}; check the "
            "manifest, or pass --allow-unknown to record them as 'not present'")
    check_all_code(root)  # a forget reruns only what its rows reach: the rest must be this code's build
    if plan.changes_data:
        with dvc_repo(root) as repo:
            if repo.status():
                raise flow.ForgetError("the project has changes that are not built yet (`dvc status` is not clean): "
                                       "run `legonet build` first, so the forget rebuilds only what the request "
                                       "touches")
            plan = flow.rebuild_plan(plan, repo.index, modules)  # the index `dvc status` just built
    journal = flow.new_journal(requests, plan)
    journal.before = {"artifacts": flow.artifact_digests(root, clean=plan.changes_data),  # status just checked
                      "outputs": flow.lock_outputs(root),
                      "dvc_lock": dvc_lock_digest(root)}
    journal.save(root)
    return journal


def remove(root: Path, plan: flow.Plan, ids: set[str], say: Callable[[str], None]) -> None:
    files = flow.remove_rows(root, plan, ids) if plan.changes_data else []
    if files:
        dvc_add(root, files)
    say(f"removed {len(plan.train_ids)} train and {len(plan.test_ids)} test samples from {len(files)} file(s)")


def rebuild(root: Path, journal: flow.Journal, plan: flow.Plan, ids: set[str], executor: str,
            worker: StageWorker | None, say: Callable[[str], None], resumed: bool) -> None:
    if not plan.changes_data:
        journal.results["checks"] = []
        return
    if executor == "local":  # the plan's stages in this process (and the worker), then `dvc commit`
        stale = rerun(root, plan.stages, worker, timings=journal.timings)
        ran, checked = list(plan.stages), None
    else:  # Ray: `dvc repro`, which starts one local Ray for all its stage processes
        ran = repro(root, timings=journal.timings, total=len(plan.stages))
        stale, checked = dvc_status(root), None if resumed else ran
    journal.results["stages_run"] = ran
    say(f"retrained adapters {plan.adapters} ({len(ran)} stages)")
    journal.results["checks"] = flow.check_rebuild(root, plan, journal.before["artifacts"], checked, ids, stale)


def register(root: Path, journal: flow.Journal, plan: flow.Plan, settings: dict[str, Any],
             worker: StageWorker | None, say: Callable[[str], None]) -> None:
    if not plan.changes_data:
        return
    registry = call(worker, tag_forget, root, settings, journal.request_ids)
    journal.results["registry"] = registry
    say(f"model version {registry['model_version']} @{','.join(registry['aliases']) or '-'}: "
        f"{registry['gate_reason']}")


def purge(root: Path, journal: flow.Journal, plan: flow.Plan, ids: set[str], params: dict[str, Any],
          worker: StageWorker | None, say: Callable[[str], None]) -> None:
    """Purge the DVC stores and MLflow of what the forgotten samples produced. A store that cannot be reached or
    refuses (StoreError) does not stop the forget: what is left to do is kept as a pending purge (no raw ID) and
    the record says so; the next `legonet forget` retries it."""
    if not plan.changes_data:
        journal.results["purge"] = {}
        return
    retention = int(params.get("purge", {}).get("retention_days", 0))
    registry = journal.results.get("registry", {})
    until = (datetime.now(UTC) + timedelta(days=retention)).date().isoformat() if retention > 0 else None
    task = {"request_ids": journal.request_ids, "before": sorted(set(journal.before["outputs"].values())),
            "keep_version": registry.get("model_version"), "retain_until": until,
            **{k: journal.results[k] for k in ("doomed_objects", "mlflow_plan") if k in journal.results}}
    if "doomed_objects" not in task:
        task["keyed_ids"] = pending.keyed(root, ids)

    def saved() -> None:
        journal.results.update({k: task[k] for k in ("doomed_objects", "mlflow_plan") if k in task})
        journal.save(root)

    try:
        result = pending.run_purge(root, task, params, worker, saved)
    except StoreError as exc:
        journal.results["purge"] = pending.record(root, task, pending.one_line(exc))
        say("a store refused the purge: recorded as pending, the forget goes on")
        return
    pending.dropped(root, journal.request_ids)  # a resumed forget whose first try was recorded as pending
    journal.results["purge"] = result
    if retention == 0 and "champion" not in registry.get("aliases", []):
        say("no version is champion now: the previous champion was trained on the forgotten samples and is purged; "
            "the new version stays candidate until a build passes the gate")
    say(f"purged {sum(v['deleted_objects'] for v in result['dvc'].values())} DVC object(s) from "
        f"{len(result['dvc'])} store(s), {len(result['mlflow'].get('deleted_model_versions', []))} model version(s)")


def audit(root: Path, journal: flow.Journal, plan: flow.Plan, params: dict[str, Any], worker: StageWorker | None,
          say: Callable[[str], None], resumed: bool) -> None:
    log = audit_log(root, params, memo=True)
    hmac_key = audit_key(root, params, log)
    signing = signing_key(root, params, log)  # pins its fingerprint in the key dir when it is created
    log = audit_log(root, params, memo=True)  # trust as it stands after a first-use pin
    # per file (an adapter block is one directory output in dvc.lock); the rebuild left `dvc status` clean, which
    # a resumed forget cannot vouch for
    after = flow.artifact_digests(root, clean=plan.changes_data and not resumed)
    before = journal.before["artifacts"]
    completed = pending.completed(root)
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
        "dvc_lock": {"before": journal.before["dvc_lock"], "after": dvc_lock_digest(root)},
        "code_revision": git_revision(root),
        "params_sha256": params_digest(root),
        "registry": journal.results.get("registry", {}),
        "stages_run": journal.results.get("stages_run", []),
        "checks": journal.results.get("checks", []),
        "purge": journal.results.get("purge", {}),
        "completed_purges": completed,  # pending purges of earlier requests finished since the last record
        "timings_seconds": journal.timings,
        "platform": platform_tags(),
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    removed = set(plan.train_ids) | set(plan.test_ids)
    recorded = {r["request_id"] for r in log.summaries()}
    for request_id, sample_ids in journal.request_samples.items():
        if request_id in recorded:  # written before a crash that lost the state change
            continue
        own = set(sample_ids)
        predicate = {**shared, "request_id": request_id,
                     "sealed": seal(hmac_key, journal.request_meta[request_id]),  # reason, received_at
                     "forgotten_ids": _digests(hmac_key, own & removed),
                     "already_forgotten_ids": _digests(hmac_key, own & set(plan.already_forgotten)),
                     "not_present_ids": _digests(hmac_key, own & set(plan.unknown_ids))}
        log.append(predicate, flow.subjects(root), signing)
    pending.recorded(root, completed)
    note = log.checkpoint(origin(hmac_key), signing)
    anchor(root, params, note)
    version = journal.results.get("registry", {}).get("model_version")
    if version is not None:
        call(worker, tag_checkpoint, root, params["mlflow"], version, note)
    say(f"audit checkpoint (keep it: `legonet audit verify --checkpoint FILE` proves later logs extend it):\n{note}")


def _quality(root: Path) -> dict[str, Any]:
    """The quality checkpoint of the build this forget produced: its result file's sha256, pass/fail, failures."""
    from pipeline.data.quality import RESULT, read_result

    path = root / RESULT
    result = read_result(path)
    return {"result": RESULT.as_posix(), "result_sha256": file_sha256(path) if path.is_file() else None,
            "passed": bool(result["success"]), "failed_expectations": result["failed"]}


def _digests(key: bytes, sample_ids: set[str]) -> list[str]:
    return sorted(id_digest(key, i) for i in sample_ids)


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
    plan = _plan(root, requests, params)
    if plan.changes_data:
        with dvc_repo(root) as repo:
            plan = flow.rebuild_plan(plan, repo.index, worker_modules(root))
    estimate = _estimate(root, params, plan.stages)
    say(f"would forget {len(plan.train_ids)} train and {len(plan.test_ids)} test samples "
        f"({len(plan.unknown_ids)} unknown, {len(plan.already_forgotten)} already forgotten)")
    say(f"partitions: {plan.partitions}; adapters retrained: {plan.adapters}")
    say(f"stages: {' '.join(plan.stages) or '(none)'}")
    say(f"expected compute: ~{estimate:.0f} s (from the last recorded duration of each stage)")
    return {"status": "dry-run", "stages": plan.stages, "adapters": plan.adapters, "estimate_seconds": estimate}


def _estimate(root: Path, params: dict[str, Any], stages: Sequence[str]) -> float:
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    import mlflow

    from pipeline.tracking.lineage import configure

    configure(params["mlflow"]["tracking_uri"], params["mlflow"]["experiment"], root)
    runs = mlflow.search_runs(experiment_names=[params["mlflow"]["experiment"]], max_results=5000)
    if runs.empty or "metrics.stage_seconds" not in runs:
        return float("nan")
    if "tags.mlflow.parentRunId" in runs:  # Ray task runs nested under a stage run are not stages
        runs = runs[runs["tags.mlflow.parentRunId"].isna()]
    last = runs.sort_values("start_time").groupby("tags.mlflow.runName")["metrics.stage_seconds"].last()
    kinds = last.groupby(lambda n: n.split("@")[0]).median()
    return float(sum(last.get(s, kinds.get(s.split("@")[0], 0.0)) for s in stages))

