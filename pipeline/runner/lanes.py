"""Two lanes over one list of stages: this process and the stage worker each take the next stage that is ready as
soon as they are free, so that the two cores stay busy whichever of them reaches the stages first."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from pipeline.errors import BuildError, StageFailed, WorkerFailed
from pipeline.runner.worker import StageWorker

Span = tuple[float, float]  # when a stage started and ended (time.monotonic, one clock for every process)


class Lanes:
    """Run ``names`` (an order in which they could run one after another) on two lanes: this process (the calling
    thread) and ``worker`` (a thread here that sends a stage and waits for its reply).

    A stage is ready once every stage it ``needs`` has ended. A free lane takes the first ready stage it may run, in
    ``names``' order: the worker any stage with an entry point once its imports are done, and the stages of its
    ``modules`` at once (queued behind its imports: they are its to run); this process every stage but the worker's
    own. The order decides nothing else (each stage's bytes are its inputs'): taking the next stage when a lane frees,
    rather than when this process ends its own stage, is what keeps a worker that finished early from waiting for
    this process's stage to end. A stage that fails stops both lanes at their next stage and is the run's error;
    nothing is left running when ``run`` returns or raises.
    """

    def __init__(self, names: Sequence[str], needs: Mapping[str, Collection[str]],
                 entries: Mapping[str, tuple[str, list[str]] | None], worker: StageWorker | None) -> None:
        self._waiting = list(names)
        self._needs = needs
        self._entries = entries
        self._worker = worker
        self._ended: set[str] = set()
        self._changed = threading.Condition()
        self._failure: BaseException | None = None
        self.spans: dict[str, Span] = {}
        self.imports: float | None = None  # seconds the worker spent importing, once it has replied

    def run(self, prepare: Callable[[str], None], run_here: Callable[[str], Span | None],
            ended: Callable[[str], None]) -> dict[str, Span]:
        """Run every stage: ``prepare(name)`` (under the lanes' lock: DVC's removal of its outputs, the progress
        line) by the lane that takes it, then ``run_here(name)`` in this thread or the entry point in the worker,
        then ``ended(name)`` (under the lock); return the stages' spans."""
        away = None
        if self._worker is not None:
            away = threading.Thread(target=self._lane, args=(False, prepare, self._send, ended), daemon=True,
                                    name="legonet-worker-lane")
            away.start()
        try:
            self._lane(True, prepare, run_here, ended)
        finally:
            if away is not None:
                away.join()  # its stage ends before anything is committed or the worker is stopped
        if self._failure is not None:
            raise self._failure
        return self.spans

    def _lane(self, here: bool, prepare: Callable[[str], None], run: Callable[[str], Span | None],
              ended: Callable[[str], None]) -> None:
        """Take, prepare and run stages until none is left for this lane; any error (an interrupt too) is the
        run's, and stops the other lane at its next stage."""
        try:
            while True:
                with self._changed:
                    name = self._take(here)
                    if name is None:
                        return
                    prepare(name)
                started = time.monotonic()
                span = run(name) or (started, time.monotonic())
                with self._changed:
                    self.spans[name] = span
                    self._ended.add(name)
                    ended(name)
                    self._changed.notify_all()
        except BaseException as exc:  # raised by ``run`` in the calling thread
            with self._changed:
                self._failure = self._failure or exc
                self._changed.notify_all()

    def _take(self, here: bool) -> str | None:
        """The next stage for a lane (called holding the lock), waiting while none is ready; None once none is left
        that this lane could run, or a stage failed."""
        while self._failure is None:
            ready = [name for name in self._waiting if set(self._needs.get(name, ())) <= self._ended]
            chosen = next((name for name in ready if self._fits(name, here)), None)
            if chosen is not None:
                self._waiting.remove(chosen)
                return chosen
            if not any(self._fits(name, here, later=True) for name in self._waiting):
                return None
            # the worker's readiness is another process's event, not this condition: look again shortly
            self._changed.wait(timeout=None if here else 0.05)
        return None

    def _fits(self, name: str, here: bool, later: bool = False) -> bool:
        """Whether this lane may run ``name`` now (``later``: once the worker's imports are done)."""
        entry = self._entries.get(name)
        own = self._worker is not None and entry is not None and entry[0] in self._worker.modules
        if here:
            return not own
        return entry is not None and (own or later or self._worker.ready())

    def _send(self, name: str) -> Span:
        """Run ``name``'s entry point in the worker and wait for it; return its span on the worker's clock."""
        assert self._worker is not None
        self._worker.start(*self._entries[name])
        try:
            _, span, imports = self._worker.result()
        except (StageFailed, WorkerFailed) as exc:
            raise BuildError(f"stage {name} failed: {exc}") from exc
        if imports is not None:
            self.imports = imports
        return span
