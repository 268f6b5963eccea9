"""`legonet build`: `dvc repro` with a progress bar, the registry tags of a built version, and the git commit of
what a command changed (`commit_project`)."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.errors import BuildError
from pipeline.project.code import sync_code
from pipeline.project.params import load_params, sync_generated
from pipeline.runner import executor, uptodate
from pipeline.runner.lanes import Lanes
from pipeline.runner.lockfile import write_lock
from pipeline.runner.parsed import dvc_parses_once, read_yaml_once
from pipeline.runner.worker import StageWorker, entry_point
from pipeline.tracking.digeststore import stat_of, store_for
from pipeline.tracking.head import HEAD_TAG

RUNNING = re.compile(r"^Running stage '([^']+)'")


def repro(root: Path, targets: list[str] | None = None, force: bool = False,
          console: Console | None = None, timings: dict[str, float] | None = None, total: int | None = None
          ) -> list[str]:
    """Run `dvc repro` in ``root``, streaming a progress bar; return the stages DVC actually ran, in order.

    ``timings`` (if given) receives the wall time of each stage, DVC's own bookkeeping included; ``total`` is the
    number of stages the bar counts to (default: every stage of dvc.yaml, as DVC's index lists them, counted here
    while `dvc repro` starts: building the index costs about as long as DVC's own start-up).
    """
    console = console or Console(stderr=True)
    if sync_generated(root):
        console.print("params.yaml: regenerated the encode/train lists from data.partitions and adapters.blocks")
    if sync_code(root):
        console.print("params.yaml: regenerated `code` (legonet's source and library versions of each stage)")
    cmd = [sys.executable, "-m", "dvc", "repro", *(["-f"] if force else []), *(targets or [])]
    ran: list[str] = []
    lines: list[str] = []
    # executor: ray -> one local Ray for every stage of this repro (unless RAY_ADDRESS names a cluster)
    with executor.cluster(load_params(root)) as ray_env, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                     TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("dvc repro", total=total)
        # dvc.yaml's `python -m stages.X` must run this interpreter (a virtual environment need not be activated)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **ray_env, "PATH": path})
        assert process.stdout is not None
        if total is None:
            progress.update(task, total=stage_total(root))
        mark = time.monotonic()
        for line in process.stdout:
            lines.append(line)
            match = RUNNING.match(line)
            if match:
                if ran and timings is not None:
                    timings[f"repro:{ran[-1]}"] = round(time.monotonic() - mark, 3)
                mark = time.monotonic()
                ran.append(match.group(1))
                progress.update(task, completed=len(ran) - 1, description=f"stage {match.group(1)}")
        process.wait()
        if ran and timings is not None:
            timings[f"repro:{ran[-1]}"] = round(time.monotonic() - mark, 3)
    if process.returncode != 0:
        failing = ran[-1] if ran else "(before any stage)"
        raise BuildError(f"dvc repro failed in stage {failing}:\n{''.join(lines[-40:])}")
    return ran


def rerun(root: Path, stages: Sequence[str], worker: StageWorker | None = None, console: Console | None = None,
          timings: dict[str, float] | None = None) -> dict[str, Any]:
    """Run ``stages`` (DVC addresses, in an order DVC could run them) and record them in dvc.lock; return what
    `dvc status` says afterwards (empty: every stage is up to date).

    What `dvc repro` does for each stale stage, without a process per stage and a dvc.lock rewrite per stage (at a
    forget those cost more than the work: torch, Great Expectations and MLflow take seconds to import in each
    stage process): DVC's own Stage objects remove the stage's non-persistent outputs, the stage's entry point
    (``python -m stages.X ARGS`` in dvc.yaml) runs in this process with the project as working directory, then
    DVC saves and commits every stage's deps and outs, run cache included, and writes dvc.lock once; a stage that
    fails stops the run before anything is committed. The stages are pure functions of their files and params, so
    the bytes are those `dvc repro` gives (the oracle tests hold it). A stage whose command is not a legonet entry
    point runs as DVC runs it (its command in a shell, in the stage's folder).

    With a ``worker`` (``stage_worker``), the stages of the modules it imported run in that warm second process,
    and each of the two processes takes the next stage whose inputs are written as soon as it is free
    (``pipeline.runner.lanes``): a stage waits only for the earlier stages that write what it reads. (A worker
    started at the quality stage itself would spend longer importing than the overlap saves; started with the
    forget, it imports while this process plans, removes rows and trains.)
    """
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    from dvc.repo import Repo, lock_repo
    from dvc.stage.exceptions import StageCmdFailedError
    from dvc.stage.run import cmd_run

    from pipeline.errors import DataError, ParamsError

    console = console or Console(stderr=True)
    timings = {} if timings is None else timings
    dvc_parses_once()
    with Repo(str(root)) as repo:
        with lock_repo(repo):
            chosen = _stages(repo, stages)
            with _working_directory(root), Progress(
                    TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True) as progress:
                task = progress.add_task("rerun", total=len(chosen) + 1)
                by_name = {address(stage, root): stage for stage in chosen}
                entries = {name: entry_point(stage.cmd) for name, stage in by_name.items()}

                def prepare(name: str) -> None:
                    progress.update(task, description=f"stage {name}")
                    by_name[name].remove_outs(ignore_remove=False, force=False)

                def run_here(name: str) -> None:
                    try:
                        if entries[name] is None:
                            cmd_run(by_name[name])
                        else:
                            importlib.import_module(entries[name][0]).main(*entries[name][1])
                    except (DataError, ParamsError, StageCmdFailedError) as exc:
                        raise BuildError(f"stage {name} failed: {exc}") from exc

                lanes = Lanes(list(by_name), _needs(root, chosen), entries, worker)
                spans = lanes.run(prepare, run_here, ended=lambda _: progress.advance(task))
                for name, (start, end) in spans.items():
                    timings[f"repro:{name}"] = round(end - start, 3)
                if lanes.imports is not None:
                    timings["worker:imports"] = lanes.imports
                timings["repro:train-wall"] = round(_covered(
                    [span for name, span in spans.items() if name.startswith("train@")]), 3)
                mark = time.monotonic()
                progress.update(task, description="dvc commit")
                lend_digests(repo, chosen)
                for stage in chosen:
                    stage.save()
                    stage.commit()
                write_lock(chosen)
        mark_status = time.monotonic()
        stale = uptodate.status(repo)
        timings["repro:dvc-commit"] = round(mark_status - mark, 3)
        timings["repro:dvc-status"] = round(time.monotonic() - mark_status, 3)
    return stale


def lend_digests(repo: Any, stages: Sequence[Any]) -> int:
    """Give DVC's state database the md5 of each output file of ``stages`` that their lineage already computed (the
    digest store, ``pipeline.tracking.digeststore``), so that ``stage.save`` does not read the outputs again: a
    100-sample forget at 280k images rewrites 1.4 GB. Lent only for a file whose stat (inode, size, mtime, ctime)
    is exactly the one the digest was computed under, after the file's last change; DVC's own database trusts
    (inode, size, mtime). A file the store does not know, DVC hashes as before. Returns how many were lent."""
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    from dvc_data.hashfile.hash_info import HashInfo

    lent = 0
    for out in (out for stage in stages for out in stage.outs):
        if out.hash_name != "md5" or not os.path.exists(out.fs_path):
            continue
        top = out.fs_path
        files = [os.path.join(d, f) for d, _, names in os.walk(top) for f in names] if os.path.isdir(top) else [top]
        for path in files:
            value = _hashed(path)
            if value:
                repo.state.save(path, out.fs, HashInfo("md5", value))
                lent += 1
    return lent


def _hashed(path: str) -> str | None:
    """The md5 the digest store holds for the file at ``path`` when it was computed under exactly the file's stat
    and after its last change (its ctime), the racy rule aside: the row as the stage's process stored it, read
    here since the stage may have run in the worker. (Read from the store's table, not through its ``get``, which
    applies the racy rule: ``pipeline/tracking/digeststore.py`` is part of every stage's code, and a change to it
    would make every project encode its data again.)"""
    found = store_for(os.path.abspath(path))
    if found is None or found[0].db is None:
        return None
    store, rel = found
    try:
        row = store.db.execute("SELECT ino, size, mtime, ctime, computed, value FROM digests "
                               "WHERE path = ? AND kind = 'md5'", (rel,)).fetchone()
    except sqlite3.Error:
        return None
    stat = stat_of(os.stat(path))
    return row[5] if row is not None and tuple(row[:4]) == stat and stat[3] < row[4] else None


def _needs(root: Path, stages: Sequence[Any]) -> dict[str, list[str]]:
    """Each stage's earlier stages (in ``stages``' order) that write a file or folder it reads (or one inside it,
    or one that holds it): what must end before it starts."""
    outs = [(address(stage, root), [Path(out.fs_path) for out in stage.outs]) for stage in stages]
    needs = {}
    for i, stage in enumerate(stages):
        deps = [Path(dep.fs_path) for dep in stage.deps]
        needs[address(stage, root)] = [name for name, written in outs[:i] if any(
            o == d or o in d.parents or d in o.parents for o in written for d in deps)]
    return needs


def _covered(spans: Sequence[tuple[float, float]]) -> float:
    """The seconds during which at least one of ``spans`` ran: the wall time of stages that may overlap (the train
    stages of both processes), which their summed seconds would overstate."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def address(stage: Any, root: Path) -> str:
    """A stage's DVC address from the project's root (``train@0003``, ``sub/dvc.yaml:name``, ``data/x.dvc``),
    whatever the working directory (DVC's own ``addressing`` is relative to it)."""
    path = Path(stage.path).relative_to(root).as_posix()
    name = getattr(stage, "name", None)
    return path if name is None else name if path == "dvc.yaml" else f"{path}:{name}"


def _stages(repo: Any, names: Sequence[str]) -> list[Any]:
    """DVC's Stage objects for ``names``, in that order."""
    root = Path(repo.root_dir)
    found = {address(stage, root): stage for stage in repo.index.stages}
    missing = [name for name in names if name not in found]
    if missing:
        raise BuildError(f"dvc.yaml has no stage {missing}; run `legonet build` to regenerate params.yaml")
    return [found[name] for name in names]


@contextmanager
def dvc_repo(root: Path, reading: bool = False) -> Iterator[Any]:
    """DVC's Repo of the project, in this process (the CLI costs a Python start-up and DVC's imports): its
    ``status()`` is `dvc status` ({} when up to date), its ``index.graph`` the stage graph of dvc.yaml and the .dvc
    files. ``reading``: a block that only reads holds DVC's repo lock throughout, so that ``status()`` and the
    graph share one index (DVC drops its index when a locked call ends, unless an outer lock holds it)."""
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    from dvc.repo import Repo, lock_repo

    dvc_parses_once()
    with Repo(str(root)) as repo, lock_repo(repo) if reading else nullcontext():
        yield repo


def dvc_status(root: Path, stamp: bool = False) -> dict[str, Any]:
    """`dvc status` in this process: {} when up to date (``stamp``: then stamped, ``pipeline.runner.uptodate``; a
    forget's own checks and a build that ran stages stamp; the check before a build does not, so that an
    up-to-date `legonet build` writes nothing)."""
    with dvc_repo(root) as repo:
        return uptodate.status(repo) if stamp else repo.status()


def dvc_add(root: Path, paths: Sequence[str]) -> None:
    """`dvc add PATHS` in this process: cache the files and rewrite their .dvc pointers.

    A file that its own pointer (``PATH.dvc``) already tracks, as a forget's raw partitions and test split, is
    saved through that pointer's stage, as `dvc add` does once it has found it; `dvc add` finds it by building the
    project's index and looking each path up among every stage's outputs (at 280k images, 0.8 s and 1.2 s for a
    100-sample forget's 43 files: in proportion to partitions times stages). Any other path goes to `dvc add`."""
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    from dvc.repo import Repo, lock_repo

    dvc_parses_once()
    with Repo(str(root)) as repo:
        rest = []
        with lock_repo(repo):
            for path in paths:
                stage = _pointer_stage(repo, root / f"{path}.dvc", root / path)
                if stage is None:
                    rest.append(path)
                    continue
                stage.add_outs(stage.outs[0].fs_path, no_commit=False, relink=True)
                stage.dump()
        if rest:
            repo.add([str((root / path).absolute()) for path in rest])


def _pointer_stage(repo: Any, pointer: Path, path: Path) -> Any:
    """The stage of the .dvc file ``pointer`` when it tracks exactly the file ``path`` and nothing else, else None."""
    if not pointer.is_file():
        return None
    stage = repo.stage.load_one(path=str(pointer))
    outs = stage.outs
    if not stage.is_data_source or len(outs) != 1 or os.path.realpath(outs[0].fs_path) != os.path.realpath(path):
        return None
    return stage


@contextmanager
def _working_directory(path: Path) -> Any:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def stage_total(root: Path) -> int:
    """How many stages dvc.yaml defines (each foreach item one), as DVC's index lists them."""
    with dvc_repo(root) as repo:
        return sum(1 for stage in repo.index.stages if not stage.is_data_source)


def dvc_lock_digest(root: Path) -> str:
    return hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()


def tag_build(root: Path) -> dict[str, str]:
    """Link the newest registered version to this build: the sha256 of dvc.lock. (The version's ``project`` tag is
    the project's ID, set by the package stage; never a folder path.)"""
    params = load_params(root)
    version = _tag_newest(root, params["mlflow"], {})
    if version is None:
        return {}
    return {"version": version.version, "aliases": ",".join(version.aliases), "gate_reason":
            version.tags.get("gate_reason", ""), "dvc_lock_sha256": dvc_lock_digest(root)}


def tag_forget(root: Path, settings: Mapping[str, Any], request_ids: list[str]) -> dict[str, Any]:
    """Link the version a forget's rebuild registered to dvc.lock and the requests; return what the audit record
    says of it. (Run in the stage worker, where MLflow is imported and its store open.)"""
    version = _tag_newest(root, settings, {"legonet.forget_requests": ",".join(request_ids)})
    assert version is not None, "the forget's package stage registers a version"
    return {"model_version": version.version, "aliases": sorted(version.aliases), "gate": version.tags.get("gate", ""),
            "gate_reason": version.tags.get("gate_reason", ""), "run_id": version.tags.get("package_run_id", ""),
            "quality": version.tags.get("quality", "")}


def _tag_newest(root: Path, settings: Mapping[str, Any], tags: dict[str, str]) -> Any:
    """Log the pending lineage, then tag the newest registered version with dvc.lock's sha256 and ``tags``;
    return it as MLflow has it now (None: no version registered yet)."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient

    from pipeline.tracking.lineage import configure, flush
    from pipeline.tracking.registry import latest_version

    configure(settings["tracking_uri"], settings["experiment"], root)
    flush(root, settings)  # lineage of stages that ran without reaching `package`
    latest = latest_version(settings["registered_model"])
    if latest is None:
        return None
    client = MlflowClient()
    for key, value in {"dvc_lock_sha256": dvc_lock_digest(root), **tags}.items():
        client.set_model_version_tag(latest.name, latest.version, key, value)
    return client.get_model_version(latest.name, latest.version)  # search results carry no aliases


CHECKPOINT_TAG = "legonet.audit_checkpoint"


def tag_checkpoint(root: Path, settings: Mapping[str, Any], version: str, note: str) -> None:
    """Store a forget's signed audit checkpoint on the registered model version it produced, and on the registered
    model as the project's audit head."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient

    from pipeline.tracking.lineage import configure

    configure(settings["tracking_uri"], settings["experiment"], root)
    client = MlflowClient()
    client.set_model_version_tag(settings["registered_model"], version, CHECKPOINT_TAG, note)
    # the head every clone's next forget or build must extend (pipeline.tracking.head)
    client.set_registered_model_tag(settings["registered_model"], HEAD_TAG, note)


def estimate_seconds(root: Path, params: dict[str, Any], stages: Sequence[str]) -> float:
    """What ``stages`` cost in the last build or forget that ran each (MLflow's ``stage_seconds``; a stage of an
    adapter block never run alone takes the median of its kind): the estimate `legonet forget --dry-run` shows."""
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


# What git holds of a project: the pipeline, its params, DVC's pointers (.dvc files, dvc.lock and the .gitignore
# files next to DVC's outputs), metrics and the audit log. Named by pattern rather than `git add -A`: a file the
# user drops into the folder (a deletion manifest holds raw sample IDs) or a data file must never reach git history,
# which no forget can purge.
GIT_PATHS = ("dvc.yaml", "dvc.lock", "params.yaml", "foreach.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore",
             "metrics", "audit", ":(glob)**/.gitignore", ":(glob)data/**/*.dvc")


def commit_project(root: Path, message: str) -> bool:
    """Commit every change under ``GIT_PATHS`` (deletions too) when the project is a git repository, so that
    `git status` is clean after each legonet command and every state a record names can be checked out.
    Returns whether a commit was made."""
    if not (root / ".git").exists():
        return False
    ignore_outputs(root)
    # a pathspec matching nothing fails `git add`: keep those that match a tracked (deleted ones too) or an
    # untracked, not ignored file
    paths = [p for p in GIT_PATHS if subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", p],
                                                    cwd=root, capture_output=True, text=True, check=True).stdout]
    if not paths:  # `git add -A --` with no path would add the whole tree
        return False
    subprocess.run(["git", "add", "-A", "--", *paths], cwd=root, check=True, capture_output=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=root).returncode == 0:
        return False
    has_identity = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True).returncode == 0
    identity = [] if has_identity else ["-c", "user.name=legonet", "-c", "user.email=legonet@localhost"]
    subprocess.run(["git", *identity, "commit", "-q", "-m", message], cwd=root, check=True, capture_output=True)
    return True


def ignore_outputs(root: Path) -> list[str]:
    """List in a .gitignore beside it every DVC output (dvc.lock and .dvc files) that git does not ignore yet.

    DVC writes these entries when a stage succeeds, but a `dvc repro` that fails later removes the entries of
    every stage it ran (its scm_context undoes them on error), although those stages stay in dvc.lock and are not
    run again: their outputs (embeddings, adapters) would then show as untracked files in git. Returns the paths
    added.
    """
    outputs = []
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (read_yaml_once(lock) or {}).get("stages", {})
        uncached = _uncached(root)  # in git by design (metrics, plots)
        outputs += [out["path"] for stage in stages.values() for out in stage.get("outs", [])
                    if out["path"] not in uncached]
    for pointer in (root / "data").rglob("*.dvc"):
        base = pointer.parent.relative_to(root)
        outputs += [(base / out["path"]).as_posix() for out in (read_yaml_once(pointer) or {})
                    .get("outs", [])]
    if not outputs:
        return []
    checked = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-v", "-n"], cwd=root,
                             input="\n".join(outputs) + "\n", capture_output=True, text=True).stdout
    missing = [line.split("\t", 1)[1] for line in checked.splitlines() if line.startswith("::\t")]
    for path in missing:
        gitignore = (root / path).parent / ".gitignore"
        existing = gitignore.read_text() if gitignore.is_file() else ""
        gitignore.write_text(existing + ("" if not existing or existing.endswith("\n") else "\n")
                             + f"/{Path(path).name}\n")
    return missing


def _uncached(root: Path) -> set[str]:
    """Outputs dvc.yaml marks `cache: false` (metrics and plots): git, not DVC, holds them."""
    pipeline = read_yaml_once(root / "dvc.yaml") or {}
    found = set()
    for stage in pipeline.get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                if isinstance(entry, dict):
                    found |= {path for path, flags in entry.items() if (flags or {}).get("cache") is False}
    return found
