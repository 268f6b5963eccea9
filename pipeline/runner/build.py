"""`legonet build`: `dvc repro` with a progress bar, then tag the registered version with its `dvc.lock` digest."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.project.layout import METRICS
from pipeline.project.params import load_params, sync_generated
from pipeline.runner import executor

RUNNING = re.compile(r"^Running stage '([^']+)'")


class BuildError(RuntimeError):
    """`dvc repro` failed; the message carries the failing stage and DVC's own output."""


def repro(root: Path, targets: list[str] | None = None, force: bool = False,
          console: Console | None = None, timings: dict[str, float] | None = None, total: int | None = None
          ) -> list[str]:
    """Run `dvc repro` in ``root``, streaming a progress bar; return the stages DVC actually ran, in order.

    ``timings`` (if given) receives the wall time of each stage, DVC's own bookkeeping included; ``total`` is the
    number of stages the bar counts to (default: every stage of dvc.yaml, as DVC's index lists them).
    """
    console = console or Console(stderr=True)
    if sync_generated(root):
        console.print("params.yaml: regenerated the encode/adapter lists from data.partitions and adapters.n")
    total = stage_total(root) if total is None else total
    cmd = [sys.executable, "-m", "dvc", "repro", *(["-f"] if force else []), *(targets or [])]
    ran: list[str] = []
    lines: list[str] = []
    # executor: ray -> one local Ray for every stage of this repro (unless RAY_ADDRESS names a cluster)
    with executor.cluster(load_params(root)) as ray_env, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                     TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("dvc repro", total=total)
        process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **ray_env})
        assert process.stdout is not None
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
    beside this one's next stages that do not read their outputs; this process waits for them only where a later
    stage reads what they write. (A worker started at the quality stage itself would spend longer importing than
    the overlap saves; started with the forget, it imports while this process plans, removes rows and trains.)
    """
    from dvc.repo import Repo, lock_repo
    from dvc.stage.exceptions import StageCmdFailedError
    from dvc.stage.run import cmd_run

    from pipeline.data.dataset import DataError
    from pipeline.project.params import ParamsError

    console = console or Console(stderr=True)
    timings = {} if timings is None else timings
    with Repo(str(root)) as repo:
        with lock_repo(repo):
            chosen = _stages(repo, stages)
            with _working_directory(root), Progress(
                    TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True) as progress:
                task = progress.add_task("rerun", total=len(chosen) + 1)
                away = None  # the stage the worker runs now
                for stage in chosen:
                    if away is not None and _feeds(away, stage):
                        _finish(worker, away, timings)
                        progress.advance(task)
                        away = None
                    mark = time.monotonic()
                    progress.update(task, description=f"stage {stage.addressing}")
                    stage.remove_outs(ignore_remove=False, force=False)
                    entry = entry_point(stage.cmd)
                    if worker is not None and entry is not None and entry[0] in worker.modules:
                        if away is not None:  # one stage at a time in the worker
                            _finish(worker, away, timings)
                            progress.advance(task)
                        worker.start(*entry)
                        away = stage
                        continue
                    try:
                        if entry is None:
                            cmd_run(stage)
                        else:
                            importlib.import_module(entry[0]).main(*entry[1])
                    except (DataError, ParamsError, StageCmdFailedError) as exc:
                        raise BuildError(f"stage {stage.addressing} failed: {exc}") from exc
                    timings[f"repro:{stage.addressing}"] = round(time.monotonic() - mark, 3)
                    progress.advance(task)
                if away is not None:
                    assert worker is not None
                    _finish(worker, away, timings)
                    progress.advance(task)
                mark = time.monotonic()
                progress.update(task, description="dvc commit")
                for stage in chosen:
                    stage.save()
                    stage.commit()
                chosen[0].dvcfile.dump_stages(chosen, update_pipeline=False)
        mark_status = time.monotonic()
        stale = repo.status()
        timings["repro:dvc-commit"] = round(mark_status - mark, 3)
        timings["repro:dvc-status"] = round(time.monotonic() - mark_status, 3)
    return stale


def _feeds(stage: Any, later: Any) -> bool:
    """Whether ``later`` reads a file or folder ``stage`` writes (or one inside it, or one that holds it)."""
    outs = [Path(out.fs_path) for out in stage.outs]
    deps = [Path(dep.fs_path) for dep in later.deps]
    return any(o == d or o in d.parents or d in o.parents for o in outs for d in deps)


def _finish(worker: StageWorker, stage: Any, timings: dict[str, float]) -> None:
    """Wait for the stage the worker runs; its failure is the rerun's."""
    try:
        _, seconds, imports = worker.result()
    except StageFailed as exc:
        raise BuildError(f"stage {stage.addressing} failed: {exc}") from exc
    timings[f"repro:{stage.addressing}"] = seconds
    if imports is not None:
        timings["worker:imports"] = imports


def worker_modules(root: Path) -> frozenset[str]:
    """The entry-point modules of dvc.yaml's stages that run in the stage worker: those that declare a
    ``preload()``, the imports that cost seconds (Great Expectations, MLflow), made ahead in the worker while this
    process plans and trains. Read from the source, not imported: importing them here is the cost the worker
    exists to keep off the forget's path."""
    import ast
    import importlib.util

    from pipeline.data.dataset import read_yaml

    commands = [(stage.get("do") or stage).get("cmd") for stage in
                (read_yaml(root / "dvc.yaml") or {}).get("stages", {}).values()]
    modules = {entry[0] for cmd in commands if (entry := entry_point(cmd)) is not None}
    declared = set()
    for module in modules:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text() if spec is not None and spec.origin else ""
        if any(isinstance(node, ast.FunctionDef) and node.name == "preload" for node in ast.parse(source).body):
            declared.add(module)
    return frozenset(declared)


class StageFailed(RuntimeError):
    """A stage in the worker process stopped on bad data or params (the message is the stage's own)."""


class StageWorker:
    """A second Python process that imports the stage modules it is given, then runs their entry points (and other
    functions of theirs) on request.

    A forget's stages run in the forget's own process (``rerun``), and each import is paid once per forget; the
    quality checkpoint's Great Expectations and the package's MLflow cost seconds more, on a path where the other
    core sits idle. Started when the forget starts, this process imports them while the first one plans, removes
    the rows and retrains; then runs those stages with the project as working directory, and the forget's own
    MLflow steps (``call``), so that MLflow is imported and its store opened once per forget, here. Spawned, not
    forked: a fork of a process that holds DVC's repo lock, threads and open SQLite handles is not safe.
    """

    def __init__(self, root: Path, modules: Sequence[str], preload: Sequence[str] = ()) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.modules = frozenset(modules)
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, str(root.resolve()), [*modules, *preload]),
                                        name="legonet-stage-worker", daemon=True)
        self._process.start()
        child.close()
        self._imports_reported = False

    def start(self, module: str, args: Sequence[Any], function: str = "main", **kwargs: Any) -> None:
        """Ask the worker to run ``module.function(*args, **kwargs)`` (a stage's entry point by default)."""
        try:
            self._conn.send((module, function, list(args), kwargs))
        except OSError:
            raise self._ended() from None

    def result(self) -> tuple[Any, float, float | None]:
        """(what the function returned, the seconds it took, the seconds the worker spent importing: reported
        once); raises ``StageFailed`` for bad data or params, ``BuildError`` for anything else."""
        try:
            kind, value, imports = self._conn.recv()
        except (EOFError, OSError):
            raise self._ended() from None
        if kind != "ok":
            error, text = value
            if kind == "failed":
                raise StageFailed(text) from error
            raise BuildError(f"the stage worker process failed:\n{text}") from error
        first = not self._imports_reported
        self._imports_reported = True
        return *value, imports if first else None

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in the worker (a module-level function; arguments and result pickle),
        raising its own exception as this process would have (when it pickles; else ``BuildError`` with the
        traceback)."""
        self.start(function.__module__, args, function.__qualname__, **kwargs)
        try:
            return self.result()[0]
        except (StageFailed, BuildError) as exc:
            raise exc.__cause__ or exc from None

    def _ended(self) -> BuildError:
        self._process.join(timeout=1)
        return BuildError(f"the stage worker process ended unexpectedly (exit code {self._process.exitcode})")

    def close(self) -> None:
        """Stop the worker: at once if it is still importing (a forget with nothing to rebuild) or running a stage (a
        forget that failed); each stage's output is flushed before its reply, so nothing printed is lost."""
        with suppress(OSError):
            self._conn.send(None)
        self._process.join(timeout=0.2)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._conn.close()


def _serve(conn: Any, root: str, modules: list[str]) -> None:
    """The worker's loop: in the project ``root``, import ``modules`` and call each one's ``preload()`` (what its
    entry point would import or open late), then run one function per request."""
    import pickle
    import traceback

    from pipeline.data.dataset import DataError
    from pipeline.project.params import ParamsError

    started = time.monotonic()
    os.chdir(root)
    for name in modules:
        with suppress(Exception):  # only a head start: the stage itself meets and reports the same error
            getattr(importlib.import_module(name), "preload", lambda: None)()
    imports = round(time.monotonic() - started, 3)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the forget's process is gone
            request = None
        if request is None:  # no interpreter teardown: MLflow's and GX's exit hooks hold it for seconds
            from multiprocessing import util

            util._run_finalizers(0)  # but release the semaphores a stage made (tqdm's lock): unreleased, they
            os._exit(0)  # are reported as leaked when the forget's process exits
        module, function, args, kwargs = request
        mark = time.monotonic()
        try:
            value = getattr(importlib.import_module(module), function)(*args, **kwargs)
        except BaseException as exc:  # reported to the forget, which stops (with the exception itself if it pickles)
            try:
                error: BaseException | None = pickle.loads(pickle.dumps(exc))
            except Exception:
                error = None
            expected = isinstance(exc, DataError | ParamsError)  # bad data or params: the stage's own message
            reply: tuple[str, Any, float] = ("failed" if expected else "crashed",
                                             (error, str(exc) if expected else traceback.format_exc()), imports)
        else:
            reply = ("ok", (value, round(time.monotonic() - mark, 3)), imports)
        sys.stdout.flush()  # what the stage printed is out before the forget goes on (or stops this process)
        sys.stderr.flush()
        conn.send(reply)


@contextmanager
def stage_worker(root: Path, modules: Iterable[str] | None, preload: Sequence[str] = ()
                 ) -> Iterator[StageWorker | None]:
    """A warm ``StageWorker`` for the block that runs the stages of ``modules`` (``worker_modules``) and imports
    ``preload`` too (None: no worker); pass it to ``rerun``, and ``call`` functions in it."""
    if modules is None:
        yield None
        return
    worker = StageWorker(root, sorted(modules), preload)
    try:
        yield worker
    finally:
        worker.close()


def call(worker: StageWorker | None, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in ``worker``, or in this process without one."""
    return function(*args, **kwargs) if worker is None else worker.call(function, *args, **kwargs)


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
def dvc_repo(root: Path) -> Iterator[Any]:
    """DVC's Repo of the project, in this process (the CLI costs a Python start-up and DVC's imports): its
    ``status()`` is `dvc status` ({} when up to date), its ``index.graph`` the stage graph of dvc.yaml and the .dvc
    files, built once for both."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        yield repo


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status` in this process: {} when up to date."""
    with dvc_repo(root) as repo:
        return repo.status()


def dvc_add(root: Path, paths: Sequence[str]) -> None:
    """`dvc add PATHS` in this process: cache the files and rewrite their .dvc pointers."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(list(paths))


def entry_point(cmd: Any) -> tuple[str, list[str]] | None:
    """``python -m stages.X ARGS`` -> ("stages.X", ARGS); None for any other command."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else []
    if len(argv) >= 3 and argv[0] == "python" and argv[1] == "-m" and re.fullmatch(r"stages\.\w+", argv[2]):
        return argv[2], argv[3:]
    return None


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
    """Link the newest registered version to this build: the sha256 of dvc.lock and the project path."""
    from mlflow import MlflowClient

    from pipeline.tracking.lineage import configure, flush
    from pipeline.tracking.registry import latest_version

    params = load_params(root)
    configure(params["mlflow"]["tracking_uri"], params["mlflow"]["experiment"], root)
    flush(root, params["mlflow"])  # lineage of stages that ran without reaching `package`
    latest = latest_version(params["mlflow"]["registered_model"])
    if latest is None:
        return {}
    version = MlflowClient().get_model_version(latest.name, latest.version)  # search results carry no aliases
    tags = {"dvc_lock_sha256": dvc_lock_digest(root), "project": str(root.resolve())}
    for key, value in tags.items():
        MlflowClient().set_model_version_tag(version.name, version.version, key, value)
    aliases = ",".join(version.aliases) if version.aliases else ""
    return {"version": version.version, "aliases": aliases, "gate_reason": version.tags.get("gate_reason", ""),
            **tags}


def summary(root: Path) -> dict[str, float]:
    """Metrics of the last build, as `dvc metrics show` reads them."""
    out: dict[str, float] = {}
    for name in ("evaluate.json", "baseline.json"):
        path = root / METRICS / name
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out
