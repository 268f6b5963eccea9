"""The forget flow (docs/design.md section 5): a deletion request in, exactly-unlearned artifacts, a signed record out.

The flow is a journalled state machine, ``received -> quarantined -> data-removed -> rebuilt -> registered ->
purged -> audited -> committed``. The journal (outside git, in ``.legonet/``) is written before each step's effects are
trusted, so a crash anywhere is finished by re-running the same command; every step is idempotent. One writer at
a time holds the project lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.dataset import read_table, write_table
from pipeline.data.salt import data_secret
from pipeline.errors import ExactnessError, ForgetError, LockBusy
from pipeline.forget.requests import DeletionRequest, Journal, merge_requests
from pipeline.project.code import check_all_code
from pipeline.project.layout import (
    REFERENCE,
    ROUTING,
    STATE_DIR,
    TEST,
    adapter_info_path,
    adapter_path,
    raw_path,
    shard_path,
)
from pipeline.project.scratch import write_private
from pipeline.purge.history import ObjectIndex
from pipeline.runner import uptodate
from pipeline.runner.build import address, dvc_lock_digest, dvc_repo
from pipeline.runner.outputs import ARTIFACTS, ID_TABLES, artifact_digests, lock_outputs
from pipeline.runner.worker import entry_point
from pipeline.tracking.head import check_head, check_lease, writer_lease
from pipeline.tracking.identity import project_id
from pipeline.tracking.lineage import file_md5
from pipeline.tracking.registry import project_store

if TYPE_CHECKING:
    from pipeline.audit.record import Forgotten

STATES = ("received", "quarantined", "data-removed", "rebuilt", "registered", "purged", "audited", "committed")
PHASES = {"quarantined": "quarantine", "data-removed": "remove", "rebuilt": "rebuild", "registered": "register",
          "purged": "purge", "audited": "audit", "committed": "commit"}
LOCK = STATE_DIR / "lock"
CLEAN = STATE_DIR / "clean"  # the data state last shown to hold no ID the audit log forgot (``clean_key``)
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
    quality checkpoint right after `assign`, while the adapters train), then the one that reads the most bytes the
    forget rewrites (the largest shard first: the longest-first rule, so that the two processes that take the train
    blocks end closer together; at 280k a forget's three retrained blocks took 3.1 to 6.0 s, about in proportion to
    their shards' bytes), then dvc.yaml's order. The paths a forget may change are the rewritten files and the
    (narrowed) outputs of those stages.
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
    sizes = {path: (root / path).stat().st_size for path in [*changed, *known] if (root / path).is_file()}
    folders: dict[str, int] = {}  # the same bytes by the folder that holds them
    for path, size in sizes.items():
        folders[path.rpartition("/")[0]] = folders.get(path.rpartition("/")[0], 0) + size
    reads = {stage: sum(sizes.get(dep, 0) + sum(size for folder, size in folders.items()
                                                if folder == dep or folder.startswith(f"{dep}/"))
                        for dep in map(rel, stage.deps)) for stage in downstream}
    stages = []
    for stage in nx.lexicographical_topological_sort(graph.subgraph(downstream).reverse(copy=False),
                                                     key=lambda s: (not in_worker[s], -reads[s], position[s])):
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


def clean_key(root: Path, head: str, digests: Mapping[str, str] | None = None) -> str:
    """The state the check that no forgotten sample is back answers for: the audit log's forgotten IDs (``head``,
    ``Forgotten.head``) and the bytes of the routing index and the test split (md5, from ``digests`` if measured)."""
    found = digests or {}
    md5s = [found.get(path.as_posix()) or file_md5(root / path) for path in (ROUTING, TEST)]
    return hashlib.sha256("\n".join([head, *md5s]).encode()).hexdigest()


def mark_clean(root: Path, head: str, digests: Mapping[str, str]) -> None:
    """Mark the state a forget leaves (``digests``: its artifacts, measured) as holding no forgotten sample under
    the log it has just extended (``head``). True by construction: the plan checked the data against the log
    before, a forget only removes rows, and its last check found none of its own IDs; so the next plan on this
    state skips hashing every training and test ID (the check grew with N). `audit verify` never relies on it."""
    write_private(root / CLEAN, clean_key(root, head, digests).encode())


def plan_batch(root: Path, sample_ids: Sequence[str], reference_ids: set[str], forgotten: Forgotten, n: int,
               blocks: int) -> Plan:
    """Look up each ID: train (routing index), test, reference (refused), forgotten earlier, or unknown.

    ``forgotten(ids)`` names the requests that forgot each of ``ids`` earlier (the audit log). The project's
    training and test data must hold none of them but those requested now: a sample a request forgot that is back
    (a dataset re-imported with it, then built) is refused here, before anything changes; unless the last forget
    left this very routing index and test split under this very log (``mark_clean``).
    """
    routing_path = root / ROUTING
    if not routing_path.is_file():
        raise ForgetError(f"{routing_path}: missing; build the project (`legonet build`) before forgetting")
    # the columns the look-up needs, not the label and payload digest of every row; the requested rows are picked
    # in Arrow, so no Python object is made for the other rows (a forget's look-up must not grow with N)
    try:
        routing = pq.read_table(routing_path, columns=["sample_id", "partition", "adapters"])
    except (OSError, pa.ArrowException) as exc:
        raise ForgetError(f"{routing_path}: not a readable routing index ({exc}); run `legonet build`") from exc
    ids = routing.column("sample_id")
    test_ids = set(read_table(root / TEST, ["sample_id"])["sample_id"])
    refused = sorted(set(sample_ids) & reference_ids)
    if refused:
        raise ForgetError(f"{len(refused)} ID(s) belong to the reference split, which keys and projection are "
                          f"fitted on and which is not deletable: {refused[:5]}; remove them from the manifest")
    marked = (root / CLEAN).is_file() and (root / CLEAN).read_text() == clean_key(root, forgotten.head)
    back = {} if marked else forgotten((set(ids.to_pylist()) | test_ids) - set(sample_ids))
    if back:
        owners = sorted({r for found in back.values() for r in found})
        raise ForgetError(f"{len(back)} sample(s) that request(s) {', '.join(owners)} forgot are back in "
                          f"{ROUTING} or {TEST}: {sorted(back)[:5]}; add them to this request's manifest to forget "
                          "them again")
    rows = routing.filter(pc.is_in(ids, value_set=pa.array(sorted(set(sample_ids)), type=ids.type)))
    train = sorted(rows.column("sample_id").to_pylist())
    test = sorted(i for i in sample_ids if i in test_ids)
    rest = sorted(set(sample_ids) - set(train) - set(test))
    earlier = forgotten(rest)
    adapters = sorted({int(a) for a in pc.list_flatten(rows.column("adapters")).to_pylist()})
    return Plan(train, test, sorted(set(rest) - set(earlier)), earlier,
                sorted({int(p) for p in rows.column("partition").to_pylist()}), adapters, n, blocks)


def preconditions(root: Path, params: dict[str, Any]) -> None:
    """Refuse before any change, under the project lock: a project without its ID could not purge its MLflow
    objects, a clone behind the registry's audit head would rebuild on data another clone forgot, and one whose
    peer holds the writer lease would write beside it."""
    project_id(params)
    data_secret(root)  # nor could one without its data secret write its tables (pipeline.data.salt)
    store = project_store(params["mlflow"])
    check_head(root, params, store)
    check_lease(root, store)


class Writer:
    """The shared registry's writer lease (pipeline.tracking.head), taken by ``hold`` before a command's first
    write, so that no other clone starts a forget or build until this one is committed; a request refused before
    that writes nothing, the lease included. Released when the block ends."""

    def __init__(self, root: Path, params: dict[str, Any]) -> None:
        self.root, self.store, self.held, self.taken = root, project_store(params["mlflow"]), ExitStack(), False

    def hold(self) -> None:
        if not self.taken:
            self.held.enter_context(writer_lease(self.root, self.store))
            self.taken = True

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.held.close()


def rows_plan(root: Path, requests: Sequence[DeletionRequest], params: dict[str, Any],
              forgotten: Forgotten) -> Plan:
    """The rows a batch touches and the adapters they activate (``plan_batch``), before any stage is planned."""
    reference = set(read_table(root / REFERENCE, ["sample_id"])["sample_id"])
    return plan_batch(root, merge_requests(requests), reference, forgotten, int(params["adapters"]["n"]),
                      int(params["adapters"]["blocks"]))


def plan_requests(root: Path, requests: Sequence[DeletionRequest], params: dict[str, Any],
                  forgotten: Forgotten, worker_modules: frozenset[str],
                  allow_unknown: bool, dry_run: bool = False) -> Plan:
    """The plan of a batch: its rows (``plan_batch``), then, if it changes data, the stages DVC's graph puts
    downstream of them. Refuses unknown IDs (unless ``allow_unknown``), code that is not this build's and a project
    with changes not built yet (a forget reruns only what its rows reach: the rest must be this build)."""
    plan = rows_plan(root, requests, params, forgotten)
    if not dry_run and plan.unknown_ids and not allow_unknown:
        raise ForgetError(f"{len(plan.unknown_ids)} sample ID(s) are not in this project: {plan.unknown_ids[:5]}; "
                          "check the manifest, or pass --allow-unknown to record them as 'not present'")
    if not dry_run:
        check_all_code(root)
    if not plan.changes_data:
        return plan
    with dvc_repo(root, reading=not dry_run) as repo:  # a dry run reads the graph only, taking no DVC lock
        # the status is DVC's own unless nothing it reads changed since it last came back empty
        if not dry_run and not uptodate.still_up_to_date(root) and uptodate.status(repo):
            raise ForgetError("the project has changes that are not built yet (`dvc status` is not clean): run "
                              "`legonet build` first, so the forget rebuilds only what the request touches")
        return rebuild_plan(plan, repo.index, worker_modules)  # the index `dvc status` built, if it ran


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
    crash_point(state)


def crash_point(name: str) -> None:
    """The fault-injection hook: SIGKILL this process here when ``LEGONET_CRASH_AFTER`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
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


def measure(root: Path, clean: bool = False, outputs: bool = False) -> dict[str, Any]:
    """The project's state a forget records before and after: every artifact's md5 (``artifact_digests``;
    ``clean``: `dvc status` just reported nothing) and dvc.lock's sha256; with ``outputs`` (before the change: what
    the purge supersedes) every DVC output's recorded md5."""
    state = {"artifacts": artifact_digests(root, clean), "dvc_lock": dvc_lock_digest(root)}
    return state | {"outputs": lock_outputs(root)} if outputs else state


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
    tables = artifact_digests(root, not stale, ID_TABLES)  # dvc.lock and the listings read once for both checks
    after = {path: md5 for path, md5 in tables.items() if path.split("/", 1)[0] in ARTIFACTS}
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
    residue = forgotten_ids_in(root, tables, sample_ids)
    checks.append({"name": "no forgotten ID in any data artifact or report table", "passed": not residue,
                   "detail": f"{sum(p.endswith('.parquet') for p in tables)} tables scanned" if not residue
                   else f"found in {residue}"})
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise ExactnessError("; ".join(f"{c['name']}: {c['detail']}" for c in failed))
    return checks


def index_tables(root: Path) -> int:
    """Read the IDs of every sample table in the workspace into the object memo (``forgotten_ids_in``), as a build
    ends: the tables it wrote are read once here, so the first forget after it reads only the tables it writes
    itself. Every file is hashed (not taken from dvc.lock): the memo keys what it read by the bytes it read.
    Returns how many tables were read."""
    index = ObjectIndex(root, None)
    forgotten_ids_in(root, artifact_digests(root, False, ID_TABLES), set(), index)
    return index.tables_read


def forgotten_ids_in(root: Path, digests: dict[str, str], sample_ids: set[str],
                     index: ObjectIndex | None = None) -> list[str]:
    """The Parquet artifacts among ``digests`` (path -> md5, ``artifact_digests``) that hold one of ``sample_ids``.

    Complete and exact, yet in proportion to the change: the IDs of a table are read once per md5 and kept in the
    object memo (``pipeline.purge.history.ObjectIndex``, the purge's own index), so only the files the forget
    wrote are read; every other answer is a lookup of keyed digests."""
    index = index or ObjectIndex(root, None)
    keyed = index.id_digests(sample_ids)
    tables = {p: md5 for p, md5 in digests.items() if p.endswith(".parquet")}
    index.read_ids((md5, root / p) for p, md5 in tables.items())  # the new ones in one pass
    return [p for p, md5 in tables.items() if index.holds(md5, keyed, root / p)]
