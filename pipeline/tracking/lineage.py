"""Lineage: every stage run becomes an MLflow run with its params, input and output digests and code revision.

Digests are DVC's own (md5 of file bytes, the value ``dvc.lock`` records), so an auditor can join an MLflow run to
``dvc.lock`` and to the DVC cache without either side storing the data. Only digests and small metadata are logged
here, never samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from pipeline.project.layout import STATE_DIR
from pipeline.tracking.digeststore import Stat, stat_of, store_for, trusted

T = TypeVar("T")

# (absolute path, what was computed) -> ((inode, size, mtime_ns, ctime_ns), when computed (ns), value)
_REMEMBERED: dict[tuple[str, str], tuple[Stat, int, Any]] = {}


def remembered(path: Path, kind: str, compute: Callable[[Path], T]) -> T:
    """``compute(path)``, computed again only when the file may have changed: the one file cache of the process.

    A forget runs its stages, checks and audit record in one process, which would otherwise hash every file under
    data/ and models/ several times. A value is trusted while the file's (inode, size, mtime, ctime) are those it
    was computed under AND the file had not changed for ``RACY_NS`` before it was read: git's racy-clean rule.
    Not every write is an atomic replace (a new inode): pandas ``to_csv`` and editors rewrite in place, and a
    rewrite of the same size within the filesystem clock's tick keeps size and times; only a file that was still
    changing when read can be caught so, so such a file is read again each time until it has settled. Nobody can
    set ctime (``utime`` sets it to now), so a later change always shows.
    """
    key, state = (os.path.abspath(path), kind), stat_of(os.stat(path))
    known = _REMEMBERED.get(key)
    if known is not None and trusted(state, *known[:2]):
        return known[2]
    started = time.time_ns()
    value = compute(path)
    _REMEMBERED[key] = (state, started, value)
    return value


def _stored_digest(path: Path, algorithm: str) -> str:
    """A file's digest from the project's digest store (``pipeline.tracking.digeststore``: the processes of a
    forget share it, so a file none of them rewrote is hashed once, not once per process), else hashed and stored."""
    absolute = os.path.abspath(path)
    found = store_for(absolute)
    if found is None:
        return _hash_file(path, algorithm)
    store, rel = found
    state = stat_of(os.stat(absolute))
    value = store.get(rel, algorithm, state)
    if value is None:
        started = time.time_ns()
        value = _hash_file(path, algorithm)
        store.put(rel, algorithm, state, started, value)
    return value


def _hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (``remembered`` in this process, and in the project's
    digest store across processes)."""
    return remembered(path, algorithm, lambda p: _stored_digest(p, algorithm))


def file_md5(path: Path) -> str:
    """md5 of a file's bytes, as DVC records it for a file output."""
    return file_digest(path, "md5")


def fresh_md5(path: Path) -> str:
    """md5 of a file's bytes read now, from no memo: for `legonet audit verify`, whose answer must not rest on a file
    the operator can edit (the digest store is one; a row could pair a rewritten file's stat with the old digest)."""
    return _hash_file(path, "md5")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes: the digest in-toto subjects and the audit record use."""
    return file_digest(path, "sha256")


def tree_digests(paths: Sequence[Path], root: Path) -> dict[str, str]:
    """md5 of every file under the given files or directories, keyed by path relative to ``root``, sorted."""
    found: dict[str, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            found[file.relative_to(root).as_posix()] = file_md5(file)
    return dict(sorted(found.items()))


def dvc_digest(path: Path, root: Path) -> str:
    """The md5 DVC records in ``dvc.lock`` for a file or directory dep/out.

    A directory's is DVC's ``.dir`` digest: md5 of the JSON list of its files' ``{"md5", "relpath"}`` sorted by
    relpath (``dvc_data.hashfile.tree.Tree``), so lineage holds one entry per dvc.lock line, not one per file
    (a block of adapters, or n = 1,024 shards, is one entry).
    """
    if not path.is_dir():
        return file_md5(path)
    files = tree_digests([path], path)
    listing = [{"md5": md5, "relpath": relpath} for relpath, md5 in sorted(files.items())]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def git_revision(root: Path) -> str:
    """The code revision of the checkout that holds the ``pipeline`` package, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def platform_tags() -> dict[str, str]:
    """Library versions and CPU: the bit-exactness oracle holds per platform (docs/design.md sections 2 and 8).

    Versions come from the installed distributions' metadata: importing onnxruntime only to read its version would
    cost every stage process its import, and most stages never run it.
    """
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = ",".join(f for f in ("avx2", "avx512f", "fma") if f in present)
                break
    return {
        "platform.machine": platform.machine(),
        "platform.cpu_isa": flags or "unknown",
        "platform.python": platform.python_version(),
        "platform.numpy": version("numpy"),
        "platform.onnxruntime": version("onnxruntime"),
    }


PENDING = STATE_DIR / "lineage"


class StageMetrics(dict):
    """What a stage body collects: metrics (the dict itself) and ``children``, the lineage records of work that
    ran elsewhere (Ray tasks), each logged as an MLflow run nested under the stage's run."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[dict[str, Any]] = []


def configure(tracking_uri: str, experiment: str, project: Path) -> str:
    """Point MLflow at the project's store; create the experiment, tagged with the project's ID, with its artifact
    root inside the project. Refuses an experiment another project owns (``identity.claim_experiment``).

    Returns the experiment id.
    """
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    import mlflow

    from pipeline.project.params import load_params
    from pipeline.tracking.identity import claim_experiment, project_id

    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = claim_experiment(mlflow.MlflowClient(), experiment, project_id(load_params(project)),
                                     artifact_location(tracking_uri, project))
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def absolute_store(tracking_uri: str, project: Path) -> str:
    """The tracking URI with a relative SQLite store made absolute from the project folder, whatever the working
    directory (MLflow would open, and create, ``mlflow.db`` in the working directory)."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        return f"sqlite:///{(project / tracking_uri.removeprefix('sqlite:///')).resolve()}"
    return tracking_uri


def artifact_location(tracking_uri: str, project: Path) -> str | None:
    """Where a new experiment keeps its artifacts: a server (http) where it was told (`--artifacts-destination`,
    shared storage), any other store inside the project."""
    return None if tracking_uri.startswith(("http://", "https://")) else (project / "mlartifacts").resolve().as_uri()


@contextmanager
def stage_run(
    stage: str,
    project: Path,
    params: Mapping[str, Any],
    inputs: Sequence[Path],
    outputs: Sequence[Path],
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageMetrics]:
    """Record one stage execution as a pending lineage record, turned into an MLflow run by ``flush``.

    Importing MLflow and opening its store costs seconds per process; a build runs dozens of stage processes, so
    stages write a small JSON record (digests, params, tags, metrics, times) and the next process that talks
    to MLflow anyway (the ``package`` stage, ``legonet build``, ``legonet forget``) logs them all as runs with
    their real start and end times. The yielded dict collects metrics the body wants logged, and its
    ``children`` the records of its Ray tasks (name, params, tags, metrics, inputs, start_ms, end_ms).
    """
    started, wall = time.monotonic(), time.time()
    collected = StageMetrics()
    record: dict[str, Any] = {
        "stage": stage,
        "start_ms": int(wall * 1000),
        "params": {k: str(v) for k, v in _flatten(params).items()},
        "tags": {"legonet.stage": stage, "legonet.code_revision": git_revision(_code_root()),
                 **platform_tags(), **(tags or {})},
        "inputs": {Path(path).as_posix(): dvc_digest(project / path, project) for path in inputs},
    }
    yield collected
    record["tags"].update({f"out.{Path(path).as_posix()}": dvc_digest(project / path, project) for path in outputs
                           if (project / path).exists()})
    record["metrics"] = {k: float(v) for k, v in collected.items() if isinstance(v, int | float)}
    record["metrics"]["stage_seconds"] = time.monotonic() - started
    record["end_ms"] = int(time.time() * 1000)
    pending = project / PENDING
    pending.mkdir(parents=True, exist_ok=True)
    record_id = f"{record['start_ms']:013d}-{os.getpid()}-{stage.replace('@', '_')}"
    record["id"] = record_id
    _write_pending(pending / f"{record_id}.json", record)
    for i, child in enumerate(collected.children):
        _write_pending(pending / f"{record_id}.task-{i:05d}.json", {
            "stage": f"{stage}/{child['name']}", "parent": record_id, "start_ms": child["start_ms"],
            "end_ms": child["end_ms"], "params": {k: str(v) for k, v in child.get("params", {}).items()},
            "tags": {"legonet.stage": stage, "legonet.task": child["name"], **child.get("tags", {})},
            "metrics": {k: float(v) for k, v in child.get("metrics", {}).items()},
            "inputs": child.get("inputs", {})})


def _write_pending(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    os.replace(tmp, path)


def flush(project: Path, mlflow_params: Mapping[str, Any]) -> dict[str, str]:
    """Log every pending lineage record as an MLflow run (inputs as datasets, outputs as tags); stage -> run id.

    Task records (work a stage ran on Ray) become child runs of their stage's run (tag ``mlflow.parentRunId``),
    so stages are logged first. A record is deleted only after its run is complete, so a crash in between at
    worst logs it twice; a task whose stage run is not found is logged top-level with ``legonet.parent_record``.
    """
    found = sorted((project / PENDING).glob("*.json")) if (project / PENDING).is_dir() else []
    if not found:
        return {}
    records = [(path, json.loads(path.read_text())) for path in found]
    records.sort(key=lambda item: ("parent" in item[1], item[0].name))  # stages before their tasks
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

    from pipeline.project.params import load_params
    from pipeline.tracking.identity import PROJECT_TAG, project_id

    experiment = configure(mlflow_params["tracking_uri"], mlflow_params["experiment"], project)
    client = MlflowClient()
    owner = {PROJECT_TAG: project_id(load_params(project))}
    runs: dict[str, str] = {}
    by_record: dict[str, str] = {}
    for path, record in records:
        tags = {**record["tags"], **owner}
        if "parent" in record:
            if record["parent"] in by_record:
                tags["mlflow.parentRunId"] = by_record[record["parent"]]
            else:
                tags["legonet.parent_record"] = record["parent"]
        run = client.create_run(experiment, start_time=record["start_ms"], run_name=record["stage"])
        run_id = run.info.run_id
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, record["end_ms"], 0) for k, v in sorted(record["metrics"].items())],
            params=[Param(k, v) for k, v in sorted(record["params"].items())],
            tags=[RunTag(k, v) for k, v in sorted(tags.items())],
        )
        datasets = [DatasetInput(MetaDataset(source=LocalArtifactDatasetSource(name), name=name,
                                             digest=digest)._to_mlflow_entity(),
                                 [InputTag("mlflow.data.context", "input")])
                    for name, digest in record["inputs"].items()]
        if datasets:
            client.log_inputs(run_id, datasets=datasets)
        client.set_terminated(run_id, "FINISHED", end_time=record["end_ms"])
        runs[record["stage"]] = run_id
        if "id" in record:
            by_record[record["id"]] = run_id
        path.unlink()
    return runs


def _code_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
