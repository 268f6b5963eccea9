"""How soon a running `legonet serve` stops consulting a deferred request's adapters (issue 23; target: at most 2 s
after `legonet forget --defer` returns): ``python -m bench.defer``.

`legonet serve` (``--workers`` 1, then 2) serves the champion of a built project while ``bench.load``, in its own
process, sends a steady ``--rate`` requests/s. Each round asks the server which adapters a fixed probe (one test
image) consults, picks a train sample (``data/routing.parquet``) that activates one of them, writes its manifest
and runs `legonet forget --defer` on it (it validates, journals, publishes the quarantine and returns). Meanwhile
the benchmark sends the probe every ``--interval`` seconds, each time on a new connection (a kept connection stays
with one worker). The quarantine counts as applied at the end of the first answer sent after the last answer
that still consulted one of the request's adapters, among the probe's answers and the load's (the load sends the
probe too, on connections spread over the workers); the round ends once answers have stayed clean for
``--settle`` seconds. Per round: that moment from the command's return and from its start, and the command's own
duration. Nothing is retrained between rounds: the quarantine accumulates, each round picking the sample that adds
the fewest adapters to it, until the next request could leave fewer than k adapters to answer with; then
`legonet requests run` forgets the pending requests in one rebuild (as the batch would), timed the same way until
the server answers from the retrained version with no quarantine. One last batch leaves the project with nothing
pending. Writes ``bench/results/defer.json``.

    python -m bench.defer [--project BUILT_PROJECT] [--workers 1,2] [--rounds 10] [--rate 20]

``--project`` is changed: its requests are deferred and forgotten; give a copy. Without it the default project
(the bundled MNIST 5k digits, default params) is initialised and built in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.load import Client, percentile
from bench.serve import default_project, request_body, running
from bench.setting import REPO, commit, machine
from pipeline.data.dataset import read_table
from pipeline.project.layout import ROUTING
from pipeline.project.params import load_params

TARGET = 2.0  # seconds from the command's return (issue 23)
SERVER_POLL = 0.5  # `legonet serve --poll`: its default, passed explicitly so the results name it


def consulted(answer: dict[str, Any]) -> set[int]:
    """The adapters an answer's predictions consulted (each prediction names them space-separated)."""
    return {int(a) for row in answer.get("adapters") or [] for a in (row or "").split()}


def pick(routing: pd.DataFrame, probe: set[int], quarantined: set[int], used: set[str], seed: int
         ) -> tuple[str, list[int]]:
    """A train sample not yet requested that activates an adapter the probe consults: among those, one that adds
    the fewest adapters to the quarantine (drawn with ``seed`` among equals). Returns its ID and adapters."""
    best: list[tuple[str, list[int]]] = []
    fewest = None
    for sample, adapters in zip(routing["sample_id"], routing["adapters"], strict=True):
        adapters = sorted(int(a) for a in adapters)
        if sample in used or probe.isdisjoint(adapters):
            continue
        new = len(set(adapters) - quarantined)
        if fewest is None or new < fewest:
            best, fewest = [], new
        if new == fewest:
            best.append((str(sample), adapters))
    if not best:
        raise RuntimeError(f"no unrequested train sample activates the probe's adapters {sorted(probe)}")
    return best[np.random.default_rng(seed).integers(len(best))]


def applied_at(answers: Iterable[dict[str, Any]], stale: Callable[[dict[str, Any]], bool]) -> float | None:
    """When the server is taken to answer as it should: the end (``done``) of the first successful answer sent
    after every ``stale`` one was sent (``sent``); None if there is no such answer. ``answers`` carry absolute
    ``sent`` and ``done`` times; failed requests say nothing either way."""
    ok = sorted((a for a in answers if a.get("status") == 200), key=lambda a: a["sent"])
    last_stale = max((a["sent"] for a in ok if stale(a)), default=None)
    return min((a["done"] for a in ok if last_stale is None or a["sent"] > last_stale), default=None)


def stale_for(event: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """What a stale answer is after ``event``: one consulting the deferred request's adapters, or, after a
    batch, one from the version before it or with a quarantine left."""
    if event["kind"] == "defer":
        return lambda a: not consulted(a).isdisjoint(event["adapters"])
    return lambda a: a.get("version") == event["version_before"] or bool(a.get("quarantine"))


def stats(values: list[float]) -> dict[str, float | None]:
    return {"median": round(statistics.median(values), 3) if values else None,
            "p90": round(percentile(values, 0.9), 3) if values else None,
            "max": round(max(values), 3) if values else None}


def manifest(workdir: Path, request_id: str, sample: str) -> Path:
    path = workdir / f"{request_id}.json"
    path.write_text(json.dumps({"request_id": request_id, "sample_ids": [sample], "reason": "bench.defer",
                                "received_at": datetime.now(UTC).isoformat(timespec="seconds")}))
    return path


def legonet(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", *args], cwd=project, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Prober:
    """Sends the probe on a new connection every ``interval`` seconds; keeps each answer with absolute times."""

    def __init__(self, url: str, body: bytes, interval: float) -> None:
        self.client, self.interval = Client(f"{url}/invocations", body, 30.0, keep_alive=False), interval
        self.answers: list[dict[str, Any]] = []

    def send(self) -> dict[str, Any]:
        origin = 0.0  # absolute monotonic times, comparable with the load's (one clock for every process)
        answer = self.client.send(time.monotonic(), origin)
        answer["done"] = answer["sent"] + answer["service"]
        self.answers.append(answer)
        return answer

    def until_clean(self, stale: Callable[[dict[str, Any]], bool], returned: threading.Event, settle: float,
                    timeout: float) -> None:
        """Probe until the command has returned and the answers have been clean for ``settle`` seconds, or for
        at most ``timeout`` seconds after the return."""
        clean_since = seen_return = None
        while seen_return is None or time.monotonic() - seen_return < timeout:
            answer = self.send()
            if seen_return is None and returned.is_set():
                seen_return = time.monotonic()
            if answer["status"] == 200 and not stale(answer):
                clean_since = answer["done"] if clean_since is None else clean_since
                if seen_return is not None and time.monotonic() - clean_since >= settle:
                    return
            else:
                clean_since = None
            time.sleep(self.interval)


def timed(project: Path, prober: Prober, event: dict[str, Any], command: list[str], args: argparse.Namespace
          ) -> dict[str, Any]:
    """Run a legonet command while probing until its effect shows (``event``: what ``stale_for`` needs); return
    ``event`` with the start, return and end times, the command's output and the probe's answers."""
    started, returned, ended = time.monotonic(), threading.Event(), {}
    process = legonet(project, *command)

    def wait() -> None:
        ended["out"], ended["err"] = process.communicate()
        ended["at"] = time.monotonic()
        returned.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    first = len(prober.answers)
    prober.until_clean(stale_for(event), returned, args.settle, args.timeout)
    waiter.join()
    if process.returncode != 0:
        raise RuntimeError(f"legonet {' '.join(command)} exited {process.returncode}:\n{ended['err'][-3000:]}")
    return {**event, "started": started, "returned": ended["at"], "ended": time.monotonic(),
            "command_seconds": round(ended["at"] - started, 3), "output": ended["out"],
            "probe_answers": prober.answers[first:]}


def round_(project: Path, prober: Prober, routing: pd.DataFrame, state: dict[str, Any], args: argparse.Namespace,
           workdir: Path) -> dict[str, Any]:
    """One deferred request: pick, defer, probe until applied. ``state``: the samples used and adapters held."""
    probe = prober.send()
    if probe["status"] != 200:
        raise RuntimeError(f"the probe failed before the request: {probe.get('error')}")
    request_id = f"bench-defer-{state['run']}-{len(state['used']) + 1:03d}"  # unique in the project's audit log
    sample, adapters = pick(routing, consulted(probe), state["quarantined"], state["used"], len(state["used"]))
    path = manifest(workdir, request_id, sample)
    event = timed(project, prober, {"kind": "defer", "request_id": request_id, "sample_id": sample,
                                    "adapters": adapters, "probe_consulted_before": sorted(consulted(probe))},
                  ["forget", "--defer", str(path)], args)
    summary = json.loads(event.pop("output").strip().splitlines()[-1])
    if summary.get("request_ids") != [request_id] or not set(adapters) <= set(summary["quarantined_adapters"]):
        raise RuntimeError(f"legonet forget --defer {path} did not quarantine adapters {adapters}: {summary}")
    state["used"].add(sample)
    state["quarantined"] |= set(adapters)
    event["quarantine_after"] = summary["quarantined_adapters"]
    return event


def batch(project: Path, prober: Prober, state: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`legonet requests run`: every deferred request forgotten in one rebuild, which lifts the quarantine;
    timed until the probe is answered by the new version with no quarantine."""
    before = prober.send()
    if before["status"] != 200:
        raise RuntimeError(f"the probe failed before the batch: {before.get('error')}")
    event = timed(project, prober, {"kind": "batch", "version_before": before["version"]}, ["requests", "run"],
                  args)
    event.pop("output")
    state["quarantined"] = set()
    return event


def figures(events: list[dict[str, Any]], load_records: list[dict[str, Any]]) -> None:
    """Add to each event when the server answered as it should, from the probe's answers and the load's in its
    window, from the command's return and from its start."""
    for e in events:
        window = [a for a in load_records if e["started"] <= a["sent"] <= e["ended"]]
        answers, stale = [*e["probe_answers"], *window], stale_for(e)
        at = applied_at(answers, stale)
        e["load_answers_in_window"] = len(window)
        e["stale_answers_after_return"] = sum(1 for a in answers if a["status"] == 200 and a["sent"] > e["returned"]
                                              and stale(a))
        e["from_return_seconds"] = None if at is None else round(at - e["returned"], 3)
        e["from_start_seconds"] = None if at is None else round(at - e["started"], 3)
        e["probe_answers"] = len(e["probe_answers"])


def absolute(load: dict[str, Any]) -> list[dict[str, Any]]:
    """The load's records with absolute ``sent`` and ``done`` times."""
    return [{**r, "sent": load["origin"] + r["sent"], "done": load["origin"] + r["sent"] + r["service"]}
            for r in load["records"]]


def phase(project: Path, workers: int, body: bytes, routing: pd.DataFrame, state: dict[str, Any],
          args: argparse.Namespace, workdir: Path, last: bool) -> dict[str, Any]:
    """One server with ``workers`` workers under the load: ``args.rounds`` deferred requests, with a batch
    whenever the next request could leave fewer than k adapters to answer with, and one at the end if ``last``."""
    extra = ["--poll", str(SERVER_POLL)]
    with running("legonet", project, workers, workdir, extra) as (url, startup, cmd):
        (workdir / "body.json").write_bytes(body)
        stop, out = workdir / f"stop-{workers}", workdir / f"load-{workers}.json"
        load = subprocess.Popen([sys.executable, "-m", "bench.load", "--url", f"{url}/invocations", "--body",
                                 str(workdir / "body.json"), "--rate", str(args.rate), "--concurrency", "4",
                                 "--duration", "86400", "--stop-file", str(stop), "--out", str(out)], cwd=REPO)
        prober = Prober(url, body, args.interval)
        events: list[dict[str, Any]] = []
        try:
            time.sleep(3.0)  # warm-up: the load's connections, the server's first requests
            before = os.getloadavg()
            for i in range(args.rounds):
                if len(state["quarantined"]) > state["n"] - 2 * state["k"]:  # a request adds up to k adapters
                    events.append(batch(project, prober, state, args))
                    print(f"  workers {workers}: batch, {events[-1]['command_seconds']} s", flush=True)
                events.append(round_(project, prober, routing, state, args, workdir))
                print(f"  workers {workers} round {i + 1}: command {events[-1]['command_seconds']} s, "
                      f"{events[-1]['adapters']} quarantined", flush=True)
            if last and state["quarantined"]:
                events.append(batch(project, prober, state, args))
            after = os.getloadavg()
        finally:
            stop.touch()
            load.wait(300)
        result = json.loads(out.read_text())
    figures(events, absolute(result))
    rounds = [e for e in events if e["kind"] == "defer"]
    for e in events:
        print(f"  workers {workers} {e.get('request_id', 'batch')}: answered as it should "
              f"{e['from_return_seconds']} s after the return ({e['from_start_seconds']} s after the start)",
              flush=True)
    measured = [r["from_return_seconds"] for r in rounds]
    return {"workers": workers, "server_command": " ".join(cmd), "startup_seconds": round(startup, 2),
            "loadavg_before": [round(v, 2) for v in before], "loadavg_after": [round(v, 2) for v in after],
            "load": result["summary"], "load_failures": [r for r in result["records"] if r["status"] != 200],
            "events": events,
            "from_return_seconds": stats([v for v in measured if v is not None]),
            "from_start_seconds": stats([r["from_start_seconds"] for r in rounds if r["from_start_seconds"]
                                         is not None]),
            "command_seconds": stats([r["command_seconds"] for r in rounds]),
            "not_applied": sum(v is None for v in measured),
            "target_met": all(v is not None and v <= TARGET for v in measured)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.defer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a built project to spend (default: build the default one)")
    parser.add_argument("--workers", default="1,2", help="uvicorn worker counts, one server each, in turn")
    parser.add_argument("--rounds", type=int, default=10, help="deferred requests per worker count")
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s of the background load")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two probes")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of clean answers that end a round")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds after a command returns within which its effect must show")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "defer.json")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-defer-") as tmp:
        workdir = Path(tmp)
        project = args.project.resolve() if args.project else default_project(workdir)
        routing = read_table(project / ROUTING)
        adapters = load_params(project)["adapters"]
        state: dict[str, Any] = {"used": set(), "quarantined": set(), "n": int(adapters["n"]),
                                 "k": int(adapters["k"]), "run": datetime.now(UTC).strftime("%Y%m%dT%H%M%S")}
        how = {"command": " ".join(["python -m bench.defer", *(argv if argv is not None else sys.argv[1:])]),
               "project": str(project), "commit": commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": machine(), "rate": args.rate, "rounds": args.rounds, "probe_interval": args.interval,
               "settle": args.settle, "adapters": {"n": state["n"], "k": state["k"]}, "server_poll": SERVER_POLL,
               "target_seconds": TARGET,
               "probe": "test image 0 of data/test/test.parquet, JSON dataframe_split (the load sends it too)"}
        print(f"bench.defer: {json.dumps(how)}", flush=True)
        phases = []
        for i, workers in enumerate(counts):
            phases.append(phase(project, workers, request_body(project), routing, state, args, workdir,
                                last=i == len(counts) - 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"how": how, "phases": phases}, indent=1) + "\n")
    print(f"\n| workers | deferred requests | from the return: median / p90 / max s | from the start: median / p90 / "
          f"max s | command s (median) | batches: command s; retrained version served, s after the return | "
          f"load: requests, failed | 1-min load average | at most {TARGET:g} s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        r, s = p["from_return_seconds"], p["from_start_seconds"]
        batches = "; ".join(f"{e['command_seconds']:.1f}, {e['from_return_seconds']}" for e in p["events"]
                            if e["kind"] == "batch") or "-"
        print(f"| {p['workers']} | {sum(e['kind'] == 'defer' for e in p['events'])} | {r['median']} / {r['p90']} / "
              f"{r['max']} | {s['median']} / {s['p90']} / {s['max']} | {p['command_seconds']['median']} | {batches} | "
              f"{p['load']['requests']}, {p['load']['failed']} | {p['loadavg_before'][0]}-{p['loadavg_after'][0]} | "
              f"{'yes' if p['target_met'] else 'no'} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
