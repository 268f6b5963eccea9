"""The two lanes of a rerun (pipeline.runner.lanes): this process and a real stage worker (a spawned process) each take
the next ready stage as soon as they are free; a stage starts only after the stages it reads have ended; a failure in
either lane stops the run with that stage named.

The stages here are tiny modules written to a temporary folder (sleeps that log where and when they ran), so the
test is about the schedule, not a pipeline's work; the oracle tests run the real stages through it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import BuildError, DataError
from pipeline.runner.lanes import Lanes
from pipeline.runner.worker import StageWorker

STAGE = '''
import json, os, time
from pathlib import Path

from pipeline.errors import DataError


def main(name, seconds, log, fail=""):
    started = time.monotonic()
    time.sleep(float(seconds))
    if fail:
        raise DataError(f"{name}: {fail}")
    Path(log, name).write_text(json.dumps({"pid": os.getpid(), "start": started, "end": time.monotonic()}))
'''


@pytest.fixture
def stage_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``lane_any`` (a stage either process may run) and ``lane_own`` (the worker's own), importable here and in
    the spawned worker (which starts with this process's sys.path); the folder the stages log to."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "lane_any.py").write_text(STAGE)
    (code / "lane_own.py").write_text("from lane_any import main  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(code))
    log = tmp_path / "log"
    log.mkdir()
    yield log


def _worker(root: Path) -> StageWorker:
    worker = StageWorker(root, ["lane_own"], ["lane_any"])
    deadline = time.monotonic() + 120
    while not worker.ready():
        assert time.monotonic() < deadline, "the worker never finished its imports"
        time.sleep(0.05)
    return worker


def _run(names: dict[str, tuple[str, float, str]], needs: dict[str, list[str]], log: Path,
         worker: StageWorker | None) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """Run stages ``name -> (module, seconds, failure)``; return the spans and the order ``prepare`` saw."""
    import importlib

    entries = {name: (module, [name, str(seconds), str(log), fail]) for name, (module, seconds, fail) in names.items()}
    prepared: list[str] = []

    def run_here(name: str) -> None:  # as ``rerun`` runs a stage here
        module, args = entries[name]
        try:
            importlib.import_module(module).main(*args)
        except DataError as exc:
            raise BuildError(f"stage {name} failed: {exc}") from exc

    lanes = Lanes(list(names), needs, entries, worker)
    return lanes.run(prepared.append, run_here, ended=lambda _: None), prepared


def _ran(log: Path) -> dict[str, dict[str, float]]:
    return {path.name: json.loads(path.read_text()) for path in log.iterdir()}


def test_a_free_lane_takes_the_next_ready_stage_while_the_other_runs_its_own(stage_modules: Path) -> None:
    """After ``first``, the worker runs its own stage, then takes ``y`` while this process still runs ``x`` (the
    schedule that once left the worker waiting for this process's stage to end); ``last`` reads all three."""
    log = stage_modules
    names = {"first": ("lane_any", 0.1, ""), "own": ("lane_own", 0.2, ""), "x": ("lane_any", 2.0, ""),
             "y": ("lane_any", 2.0, ""), "last": ("lane_any", 0.1, "")}
    needs = {"own": ["first"], "x": ["first"], "y": ["first"], "last": ["own", "x", "y"]}
    worker = _worker(log.parent)
    try:
        spans, prepared = _run(names, needs, log, worker)
    finally:
        worker.close()
    ran = _ran(log)
    assert sorted(ran) == sorted(names) and sorted(prepared) == sorted(names)
    assert ran["own"]["pid"] != os.getpid(), "the worker's own stage ran in this process"
    assert ran["x"]["pid"] != ran["y"]["pid"], "the two independent stages ran in one process"
    assert max(ran["x"]["start"], ran["y"]["start"]) < min(ran["x"]["end"], ran["y"]["end"]), "they did not overlap"
    for name, before in needs.items():
        assert all(ran[name]["start"] >= ran[earlier]["end"] for earlier in before), f"{name} started too early"
    for name, (start, end) in spans.items():  # the spans returned are the stages' own, whichever process ran them
        assert start <= ran[name]["start"] <= ran[name]["end"] <= end


def test_without_a_worker_every_stage_runs_here_in_order(stage_modules: Path) -> None:
    log = stage_modules
    names = {"a": ("lane_any", 0.0, ""), "own": ("lane_own", 0.0, ""), "b": ("lane_any", 0.0, "")}
    spans, prepared = _run(names, {"b": ["a"]}, log, None)
    assert prepared == ["a", "own", "b"]
    assert {record["pid"] for record in _ran(log).values()} == {os.getpid()}
    assert list(spans) == ["a", "own", "b"]


@pytest.mark.parametrize("failing", ["own", "x"])
def test_a_failing_stage_in_either_lane_stops_the_run_and_is_named(stage_modules: Path, failing: str) -> None:
    """The worker's stage (``own``) or this process's (``x``) fails: the run raises that stage's error, the stage
    that reads it never starts, and the other lane's stage has ended when ``run`` raises (nothing left running)."""
    log = stage_modules
    names = {"own": ("lane_own", 0.5, ""), "x": ("lane_any", 0.5, ""), "z": ("lane_any", 1.5, ""),
             "last": ("lane_any", 0.0, "")}
    names[failing] = (*names[failing][:2], "bad rows")
    needs = {"last": ["own", "x", "z"]}
    worker = _worker(log.parent)
    try:
        with pytest.raises(BuildError, match=rf"stage {failing} failed: {failing}: bad rows"):
            _run(names, needs, log, worker)
        raised = time.monotonic()
    finally:
        worker.close()
    ran = _ran(log)
    assert failing not in ran and "last" not in ran
    assert all(record["end"] <= raised for record in ran.values())
