"""The forget flow (docs/design.md section 5): a deletion request in, exactly-unlearned artifacts, a signed record out.

The flow is a journalled state machine, ``received -> data-removed -> rebuilt -> registered -> purged ->
audited -> committed``. The journal (outside git, in ``.legonet/``) is written before each step's effects are
trusted, so a crash anywhere is finished by re-running the same command; every step is idempotent. One writer at
a time holds the project lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.audit import disclosure
from pipeline.data.dataset import read_table, read_yaml, write_table
from pipeline.errors import ExactnessError, ForgetError, LockBusy
from pipeline.forget.manifest import DeletionRequest, merge_requests
from pipeline.project.layout import ROUTING, TEST, adapter_info_path, adapter_path, raw_path, shard_path
from pipeline.runner.build import address
from pipeline.runner.worker import entry_point
from pipeline.tracking.lineage import file_md5, file_sha256

STATES = ("received", "data-removed", "rebuilt", "registered", "purged", "audited", "committed")
PHASES = {"data-removed": "remove", "rebuilt": "rebuild", "registered": "register", "purged": "purge",
          "audited": "audit", "committed": "commit"}
STATE_DIR = Path(".legonet")
JOURNAL = STATE_DIR / "journal.json"
LOCK = STATE_DIR / "lock"
CRASH_ENV = "LEGONET_CRASH_AFTER"  # fault injection: SIGKILL this process right after the named state


@dataclass
class Plan:
    """What a batch of requests touches, computed from the routing index before anything changes; ``stages`` and
    ``changes`` from DVC's graph of the project (``rebuild_plan``) once the forget knows the project is built."""

    train_ids: list[str]
    test_ids: list[str]
    unknown_ids: list[str]
    already_forgotten: dict[str, list[str]]  # sample_id -> request ids that forgot it earlier
    partitions: list[int]
    adapters: list[int]
    n: int  # adapters.n and adapters.blocks of the build the plan was made against
    blocks: int
    stages: list[str] = field(default_factory=list)  # the DVC stages that rerun, and no others, in running order
    changes: list[str] = field(default_factory=list)  # the files and folders (with all inside) the forget may change

    @property
    def rewritten(self) -> list[str]:
        """The DVC-tracked files the forget rewrites without the forgotten rows: every other change follows."""
        return [raw_path(p).as_posix() for p in self.partitions] + ([TEST.as_posix()] if self.test_ids else [])

    @property
    def known_changes(self) -> list[str]:
        """The files inside stage outputs that the plan knows are the only ones to change (a forget changes the
        shards and the weights of the adapters its samples activated, and nothing else of those folders)."""
        return [f(j, self.n, self.blocks).as_posix() for j in self.adapters
                for f in (shard_path, adapter_path, adapter_info_path)]

    @property
    def changes_data(self) -> bool:
        return bool(self.train_ids or self.test_ids)

    @property
    def status(self) -> str:
        """What the audit record says happened: data removed, or nothing left to remove and why."""
        if self.changes_data:
            return "forgotten"
        return "already-forgotten" if self.already_forgotten else "not-present"


def rebuild_plan(plan: Plan, index: Any, worker_modules: frozenset[str]) -> Plan:
    """``plan`` with the stages the forget reruns and the paths it may change, from DVC's graph (``index``: a
    ``dvc.repo.index.Index``) of dvc.yaml and the .dvc files.

    The stages are those downstream of the files the forget rewrites (``Plan.rewritten``), in an order DVC could run
    them; a foreach item (``train@0003``) runs only when a file it reads changes, with a folder output narrowed to
    the files inside it the plan knows change (``Plan.known_changes``: a train block whose adapters keep their shards
    does not rerun); every other downstream stage runs whole. Among the stages ready to run, those the stage worker
    runs (their entry point is one of ``worker_modules``) go first, so that it works beside this process (the
    quality checkpoint right after `assign`, while the adapters train), then dvc.yaml's order. The paths a forget
    may change are the rewritten files and the (narrowed) outputs of those stages.
    """
    import networkx as nx  # DVC's graph library: a few tenths of a second to import, paid where DVC builds a graph

    if not plan.changes_data:
        return plan
    root = Path(index.repo.root_dir)
    known = plan.known_changes

    def rel(item: Any) -> str:
        return Path(item.fs_path).relative_to(root).as_posix()

    graph = index.graph  # an edge runs from a stage to each stage whose output it reads
    sources = {rel(out): stage for stage in graph for out in stage.outs if rel(out) in plan.rewritten}
    untracked = sorted(set(plan.rewritten) - set(sources))
    if untracked:
        raise ForgetError(f"{untracked}: not tracked by DVC (no .dvc file); run `legonet build` first")
    downstream = set().union(*(nx.ancestors(graph, stage) for stage in sources.values()))
    position = {stage: i for i, stage in enumerate(index.stages)}
    in_worker = {stage: (entry_point(stage.cmd) or ("",))[0] in worker_modules for stage in downstream}
    changed = list(plan.rewritten)
    stages = []
    for stage in nx.lexicographical_topological_sort(graph.subgraph(downstream).reverse(copy=False),
                                                     key=lambda s: (not in_worker[s], position[s])):
        name = address(stage, root)
        if "@" in name and not any(_overlaps(rel(dep), changed) for dep in stage.deps):  # "@": a foreach item
            continue
        stages.append(name)
        for out in stage.outs:
            inside = [p for p in known if p.startswith(f"{rel(out)}/")]
            changed += inside or [rel(out)]
    return replace(plan, stages=stages, changes=sorted(set(changed)))


def _overlaps(path: str, paths: Sequence[str]) -> bool:
    """Whether ``path`` is one of ``paths``, inside one, or holds one."""
    return any(p == path or p.startswith(f"{path}/") or path.startswith(f"{p}/") for p in paths)


@dataclass
class Journal:
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
        _write_private(root / JOURNAL, (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode())

    @classmethod
    def load(cls, root: Path) -> Journal | None:
        path = root / JOURNAL
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def _write_private(path: Path, data: bytes) -> None:
    """Atomic replace through an owner-only temporary file (never through a planted link), then fsync the folder
    so the new entry survives a crash."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@contextmanager
def project_lock(root: Path, wait: bool, notify: Callable[[str], None]) -> Iterator[None]:
    """One writer per project (flock: released by the kernel if the holder dies, so no stale locks)."""
    (root / STATE_DIR).mkdir(exist_ok=True)
    try:  # never through a planted link: the holder's note would truncate whatever it points at
        descriptor = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise ForgetError(f"{root / LOCK} is a symbolic link; legonet keeps its own lock file there: remove the "
                          "link and run the command again") from None
    with os.fdopen(descriptor, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise LockBusy(f"{root / LOCK}: another forget is running ({holder}); wait for it, "
                               "or run without --no-wait to queue behind it") from None
            notify(f"waiting for the project lock held by {holder} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def plan_batch(root: Path, sample_ids: Sequence[str], reference_ids: set[str],
               forgotten: Callable[[Iterable[str]], dict[str, list[str]]], n: int, blocks: int) -> Plan:
    """Look up each ID: train (routing index), test, reference (refused), forgotten earlier, or unknown.

    ``forgotten(ids)`` names the requests that forgot each of ``ids`` earlier (the audit log). The project's
    training and test data must hold none of them but those requested now: a sample a request forgot that is back
    (a dataset re-imported with it, then built) is refused here, before anything changes.
    """
    routing_path = root / ROUTING
    if not routing_path.is_file():
        raise ForgetError(f"{routing_path}: missing; build the project (`legonet build`) before forgetting")
    routing = read_table(routing_path).set_index("sample_id")
    test_ids = set(read_table(root / TEST)["sample_id"])
    refused = sorted(set(sample_ids) & reference_ids)
    if refused:
        raise ForgetError(f"{len(refused)} ID(s) belong to the reference split, which keys and projection are "
                          f"fitted on and which is not deletable: {refused[:5]}; remove them from the manifest")
    back = forgotten(sorted((set(routing.index) | test_ids) - set(sample_ids)))
    if back:
        owners = sorted({r for found in back.values() for r in found})
        raise ForgetError(f"{len(back)} sample(s) that request(s) {', '.join(owners)} forgot are back in "
                          f"{ROUTING} or {TEST}: {sorted(back)[:5]}; add them to this request's manifest to forget "
                          "them again")
    train = sorted(i for i in sample_ids if i in routing.index)
    test = sorted(i for i in sample_ids if i in test_ids)
    rest = sorted(set(sample_ids) - set(train) - set(test))
    earlier = forgotten(rest)
    rows = routing.loc[train]
    adapters = sorted({int(a) for row in rows["adapters"] for a in row})
    return Plan(train, test, sorted(set(rest) - set(earlier)), earlier,
                sorted({int(p) for p in rows["partition"]}), adapters, n, blocks)


def batch_id(requests: Sequence[DeletionRequest]) -> str:
    return hashlib.sha256("".join(sorted(r.digest for r in requests)).encode()).hexdigest()[:16]


def new_journal(requests: Sequence[DeletionRequest], plan: Plan) -> Journal:
    return Journal(batch=batch_id(requests), request_ids=[r.request_id for r in requests],
                   manifest_digests={r.request_id: r.digest for r in requests},
                   sample_ids=list(merge_requests(requests)),
                   request_samples={r.request_id: sorted(set(r.sample_ids)) for r in requests},
                   request_meta={r.request_id: {"reason": r.reason, "received_at": r.received_at} for r in requests},
                   plan=asdict(plan))


def plan_of(journal: Journal) -> Plan:
    return Plan(**journal.plan)


def advance(journal: Journal, root: Path, state: str, started: float) -> None:
    """Record that ``state`` is reached (durably), then honour the fault-injection hook."""
    phase = PHASES.get(state, state)
    journal.timings[phase] = round(journal.timings.get(phase, 0.0) + time.monotonic() - started, 3)
    journal.state = state
    journal.save(root)
    if os.environ.get(CRASH_ENV) == state:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_rows(root: Path, plan: Plan, sample_ids: set[str]) -> list[str]:
    """Rewrite the affected raw and test files without the forgotten rows (each write atomic); return their paths
    (the caller records them with `dvc add`).

    Idempotent: filtering a file that no longer holds the IDs rewrites identical bytes.
    """
    files = [raw_path(p) for p in plan.partitions]
    if plan.test_ids:
        files.append(TEST)
    for rel in files:
        frame = read_table(root / rel)
        write_table(frame[~frame["sample_id"].isin(sample_ids)].reset_index(drop=True), root / rel)
    return [f.as_posix() for f in files]


def lock_outputs(root: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in dvc.lock and in the .dvc files (directory outputs as .dir)."""
    out: dict[str, str] = {}
    lock = root / "dvc.lock"
    if lock.is_file():
        for stage in (read_yaml(lock) or {}).get("stages", {}).values():
            out.update({o["path"]: o["md5"] for o in stage.get("outs", []) if "md5" in o})
    for dvc_file in sorted((root / "data").rglob("*.dvc")):
        for o in (read_yaml(dvc_file) or {}).get("outs", []):
            out[(dvc_file.parent.relative_to(root) / o["path"]).as_posix()] = o["md5"]
    return dict(sorted(out.items()))


def artifact_digests(root: Path, clean: bool = False) -> dict[str, str]:
    """md5 of every file under data/ and models/ (the artifacts that decide a prediction), without DVC's own
    ``.dvc`` pointer files and ``.gitignore`` files.

    ``clean``: `dvc status` has just reported nothing, so every DVC output holds exactly what dvc.lock and the
    .dvc files record (DVC checked each one, by the same stat-keyed trust ``file_digest`` uses); a file inside an
    output then takes the md5 DVC recorded (from the cache's ``.dir`` listing for a directory output) and only
    files outside every output, or in an output whose listing is not in the cache, are hashed. Hashing all of
    data/ and models/ would make a forget's cost grow with the data (docs/design.md section 4, cost rule).
    """
    files = sorted(f for top in ("data", "models") if (root / top).is_dir()
                   for f in (root / top).rglob("*") if f.is_file() and not f.name.endswith((".dvc", ".gitignore")))
    recorded = _recorded_digests(root) if clean else {}
    return {rel: recorded.get(rel) or file_md5(f) for f in files for rel in [f.relative_to(root).as_posix()]}


def _recorded_digests(root: Path) -> dict[str, str]:
    """path -> md5 of every file inside a DVC output, as dvc.lock, the .dvc files and the cache's listings say."""
    from pipeline.purge.objects import DIR_SUFFIX, dvc_cache, object_path

    cache = dvc_cache(root)
    out: dict[str, str] = {}
    for path, md5 in lock_outputs(root).items():
        if not md5.endswith(DIR_SUFFIX):
            out[path] = md5
        elif (listing := object_path(cache, md5)).is_file():
            out.update({f"{path}/{item['relpath']}": item["md5"] for item in json.loads(listing.read_bytes())})
    return out


def expected_changes(plan: Plan) -> Callable[[str], bool]:
    """Which artifact paths a plan is allowed to change (``Plan.changes``); everything else keeps its digest."""
    allowed = set(plan.changes)
    folders = tuple(f"{p}/" for p in plan.changes)
    return lambda path: path in allowed or path.startswith(folders)


def check_rebuild(root: Path, plan: Plan, before: dict[str, str], ran: list[str] | None,
                  sample_ids: set[str], stale: dict[str, Any]) -> list[dict[str, Any]]:
    """The post-rebuild checks of the audit record. Raises ExactnessError if any fails.

    ``ran`` is what `dvc repro` ran, checked against the plan (None when the plan's stages ran in this process, or
    when a `dvc repro` was resumed after a crash and DVC's record of it is lost); ``stale`` is what `dvc status`
    reports afterwards, which must be nothing: no stage outside the plan was affected.
    """
    after = artifact_digests(root, clean=not stale)
    may_change = expected_changes(plan)
    moved = sorted(p for p in set(before) | set(after) if not may_change(p) and before.get(p) != after.get(p))
    checks = [{"name": "unaffected artifacts kept their digests", "passed": not moved,
               "detail": f"{len(before) - len(moved)} of {len(before)} files checked" if not moved
               else f"changed: {moved[:10]}"}]
    extra = sorted(set(ran or plan.stages) - set(plan.stages))
    missing = sorted(set(plan.stages) - set(ran or plan.stages))
    problems = [f"unexpected: {extra}; missing: {missing}"] if extra or missing else []
    problems += [f"still stale: {sorted(stale)[:10]}"] if stale else []
    checks.append({"name": "exactly the planned stages were stale", "passed": not problems,
                   "detail": "; ".join(problems) or f"{len(plan.stages)} stages rebuilt, `dvc status` clean"})
    residue = [p for p in after if p.endswith(".parquet") and _holds_ids(root / p, sample_ids)]
    checks.append({"name": "no forgotten ID in any data artifact", "passed": not residue,
                   "detail": f"{sum(p.endswith('.parquet') for p in after)} tables scanned" if not residue
                   else f"found in {residue}"})
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise ExactnessError("; ".join(f"{c['name']}: {c['detail']}" for c in failed))
    return checks


def _holds_ids(path: Path, sample_ids: set[str]) -> bool:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if "sample_id" not in names:
        return False
    return bool(sample_ids.intersection(pq.read_table(path, columns=["sample_id"]).column(0).to_pylist()))


def subjects(root: Path) -> dict[str, str]:
    """The in-toto subjects: every file of the packaged model and every adapter, by sha256 (the adapter files as
    one Merkle root: ``disclosure.subjects``)."""
    files = sorted(p for d in ("models/package", "models/adapters") for p in (root / d).rglob("*") if p.is_file())
    return disclosure.subjects({p.relative_to(root).as_posix(): file_sha256(p) for p in files})
