"""The stage worker: a warm second Python process that runs the stages whose imports cost seconds (Great
Expectations, MLflow) and the forget's MLflow steps, beside the forget's own process, and any other stage when it is
free."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import multiprocessing
import multiprocessing.util
import os
import pickle
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from pipeline.data.dataset import read_yaml
from pipeline.errors import DataError, ParamsError, StageFailed, WorkerFailed
from pipeline.runner.executor import executor_of


def entry_point(cmd: Any) -> tuple[str, list[str]] | None:
    """``python -m stages.X ARGS`` -> ("stages.X", ARGS); None for any other command."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else []
    if len(argv) >= 3 and argv[0] == "python" and argv[1] == "-m" and re.fullmatch(r"stages\.\w+", argv[2]):
        return argv[2], argv[3:]
    return None


def entry_modules(root: Path) -> frozenset[str]:
    """The entry-point modules of dvc.yaml's stages (``python -m stages.X``)."""
    dvc_yaml = root / "dvc.yaml"
    stages = (read_yaml(dvc_yaml) or {}).get("stages", {}) if dvc_yaml.is_file() else {}  # not a project: none
    commands = [(stage.get("do") or stage).get("cmd") for stage in stages.values()]
    return frozenset(entry[0] for cmd in commands if (entry := entry_point(cmd)) is not None)


def worker_modules(root: Path) -> frozenset[str]:
    """The entry-point modules whose stages always run in the stage worker: those that declare a ``preload()``, the
    imports that cost seconds (Great Expectations, MLflow), made ahead in the worker while this process plans and
    trains. Read from the source, not imported: importing them here is the cost the worker exists to keep off the
    forget's path."""
    declared = set()
    for module in entry_modules(root):
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text() if spec is not None and spec.origin else ""
        if any(isinstance(node, ast.FunctionDef) and node.name == "preload" for node in ast.parse(source).body):
            declared.add(module)
    return frozenset(declared)


class StageWorker:
    """A second Python process that imports the stage modules it is given, then runs their entry points (and other
    functions of theirs) on request.

    A forget's stages run in the forget's own process (``rerun``), and each import is paid once per forget; the
    quality checkpoint's Great Expectations and the package's MLflow cost seconds more, on a path where the other
    core sits idle. Started when the forget starts, this process imports them while the first one plans, removes
    the rows and retrains; then runs those stages with the project as working directory, and the forget's own
    MLflow steps (``call``), so that MLflow is imported and its store opened once per forget, here. Once its imports
    are done it also takes any other stage when it is free (``pipeline.runner.lanes``), so two independent stages
    (two train blocks, two encode partitions) run at once on the two cores; where a stage runs never changes its
    bytes. Spawned, not forked: a fork of a process that holds DVC's repo lock, threads and open SQLite handles is
    not safe.
    """

    def __init__(self, root: Path, modules: Sequence[str], preload: Sequence[str] = ()) -> None:
        context = multiprocessing.get_context("spawn")
        self.modules = frozenset(modules)
        self._conn, child = context.Pipe()
        self._ready = context.Event()  # set once the imports are done
        self._process = context.Process(target=_serve, args=(child, str(root.resolve()), [*modules, *preload],
                                                             self._ready),
                                        name="legonet-stage-worker", daemon=True)
        self._process.start()
        child.close()
        self._imports_reported = False

    def ready(self) -> bool:
        """Whether the worker has done its imports: a stage sent now starts as soon as the one it runs ends."""
        return self._ready.is_set()

    def start(self, module: str, args: Sequence[Any], function: str = "main", **kwargs: Any) -> None:
        """Ask the worker to run ``module.function(*args, **kwargs)`` (a stage's entry point by default)."""
        try:
            self._conn.send((module, function, list(args), kwargs))
        except OSError:
            raise self._ended() from None

    def result(self) -> tuple[Any, tuple[float, float], float | None]:
        """(what the function returned, when it started and ended (``time.monotonic``, one clock for every process
        of the machine), the seconds the worker spent importing: reported once); raises ``StageFailed`` for bad
        data or params, ``WorkerFailed`` for anything else."""
        try:
            kind, value, imports = self._conn.recv()
        except (EOFError, OSError):
            raise self._ended() from None
        if kind != "ok":
            error, text = value
            if kind == "failed":
                raise StageFailed(text) from error
            raise WorkerFailed(f"the stage worker process failed:\n{text}") from error
        first = not self._imports_reported
        self._imports_reported = True
        return *value, imports if first else None

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` in the worker (a module-level function; arguments and result pickle),
        raising its own exception as this process would have (when it pickles; else ``WorkerFailed`` with the
        traceback)."""
        self.start(function.__module__, args, function.__qualname__, **kwargs)
        try:
            return self.result()[0]
        except (StageFailed, WorkerFailed) as exc:
            raise exc.__cause__ or exc from None

    def _ended(self) -> WorkerFailed:
        self._process.join(timeout=1)
        return WorkerFailed(f"the stage worker process ended unexpectedly (exit code {self._process.exitcode})")

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


def _serve(conn: Any, root: str, modules: list[str], ready: Any) -> None:
    """The worker's loop: in the project ``root``, import ``modules`` and call each one's ``preload()`` (what its
    entry point would import or open late), set ``ready``, then run one function per request."""
    started = time.monotonic()
    os.chdir(root)
    for name in modules:
        with suppress(Exception):  # only a head start: the stage itself meets and reports the same error
            getattr(importlib.import_module(name), "preload", lambda: None)()
    imports = round(time.monotonic() - started, 3)
    ready.set()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the forget's process is gone
            request = None
        if request is None:  # no interpreter teardown: MLflow's and GX's exit hooks hold it for seconds
            # but release the semaphores a stage made (tqdm's lock): unreleased, they are reported as leaked when
            # the forget's process exits
            multiprocessing.util._run_finalizers(0)
            os._exit(0)
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
            reply = ("ok", (value, (mark, time.monotonic())), imports)
        sys.stdout.flush()  # what the stage printed is out before the forget goes on (or stops this process)
        sys.stderr.flush()
        conn.send(reply)


@contextmanager
def stage_worker(root: Path, params: Mapping[str, Any], modules: Iterable[str], preload: Sequence[str] = ()
                 ) -> Iterator[StageWorker | None]:
    """A warm ``StageWorker`` for the block that runs the stages of ``modules`` (``worker_modules``) and imports
    ``preload`` too; pass it to ``rerun``, and ``call`` functions in it. None with the Ray executor: `dvc repro`
    then runs every stage (one local Ray for all its stage processes), and ``call`` runs in this process."""
    if executor_of(params) != "local":
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
