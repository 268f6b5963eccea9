"""Serving benchmark: `legonet serve` against `mlflow models serve`, same model, same machine, same load.

Both serve ``models:/<model>@champion`` of one built project from its MLflow store, with the same number of
uvicorn workers, and take the same request (one held-out test image, JSON ``dataframe_split``) from the same load
generator (``bench.load``, its own process). Each server is measured in turn, in two phases: a closed loop
(``--concurrency`` clients back to back for ``--duration`` seconds: peak throughput) and an open loop at ``--rate``
requests/s (latency at a steady load below both peaks, measured from when each request was due). Each phase
records the machine's load average before and after: the machine is shared, so a figure is only as good as the
quiet it was measured in. Writes ``bench/results/serve.json``.

    python -m bench.serve [--project BUILT_PROJECT] [--workers 1] [--concurrency 8] [--duration 20] [--rate 20]

Without ``--project`` the default project (the bundled MNIST 5k digits, default params) is initialised and built
in a temporary folder first. ``--rounds`` repeats the pair, alternating which server goes first; the table
gives the medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.load import run as load
from bench.setting import REPO, commit
from pipeline.data.dataset import read_table
from pipeline.tracking.lineage import absolute_store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(kind: str, project: Path, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one server on ``project``'s champion."""
    settings = yaml.safe_load((project / "params.yaml").read_text())["mlflow"]
    if kind == "legonet":
        return ([sys.executable, "-m", "pipeline.cli.main", "serve", "--port", str(port), "--workers", str(workers),
                 "--no-access-log"], {})
    model = f"models:/{settings['registered_model']}@champion"
    return ([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
            {"MLFLOW_TRACKING_URI": absolute_store(settings["tracking_uri"], project),
             "MLFLOW_DISABLE_TELEMETRY": "true"})


def wait_for_ping(url: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not answer /ping in {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def running(kind: str, project: Path, workers: int, workdir: Path, extra: Sequence[str] = ()
            ) -> Iterator[tuple[str, float, list[str]]]:
    """One server on ``project``'s champion, up until the block ends: its URL, its start-up seconds (to the first
    /ping) and its command line. ``extra``: more options of `legonet serve`. Stopped by process group (uvicorn's
    workers with it)."""
    port = free_port()
    cmd, env = server_command(kind, project, port, workers)
    cmd = [*cmd, *extra]
    log = workdir / f"{kind}-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=project, env={**os.environ, **env}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, wait_for_ping(url, process, log), cmd
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def measure(kind: str, project: Path, body: bytes, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with running(kind, project, args.workers, workdir) as (url, startup, cmd):
        load(f"{url}/invocations", body, None, 2, 3.0, None)  # warm-up: sessions, caches, connections
        phases = {}
        for phase, rate in (("closed", None), ("open", args.rate)):
            before = os.getloadavg()[0]
            result = load(f"{url}/invocations", body, rate, args.concurrency, args.duration, None)
            phases[phase] = {**result["summary"], "loadavg_1min_before": round(before, 2),
                             "loadavg_1min_after": round(os.getloadavg()[0], 2)}
            print(f"  {kind} {phase}: {json.dumps(phases[phase])}", flush=True)
        return {"command": " ".join(cmd), "startup_seconds": round(startup, 2), **phases}


def default_project(workdir: Path) -> Path:
    """`legonet init` (bundled MNIST 5k, default params) and `legonet build` in ``workdir``."""
    root = workdir / "project"
    for args in (["init", str(root)], ["-C", str(root), "build"]):
        subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], check=True, capture_output=True)
    return root


def request_body(project: Path) -> bytes:
    image = read_table(project / "data/test/test.parquet")["image"].iloc[0]
    pixels = np.frombuffer(image, dtype=np.uint8).astype(int).tolist()
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[pixels]]}}).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a built project (default: build the default one)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of each server")
    parser.add_argument("--concurrency", type=int, default=8, help="client connections")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s of the open-loop phase")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds; the servers take turns, first in one order then the other")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        project = args.project.resolve() if args.project else default_project(workdir)
        body = request_body(project)
        how = {"command": " ".join(["python -m bench.serve", *(argv if argv is not None else sys.argv[1:])]),
               "project": str(project), "commit": commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
               "workers": args.workers, "concurrency": args.concurrency, "duration": args.duration,
               "rate": args.rate, "rounds": args.rounds, "request": "one 28x28 test image, JSON dataframe_split"}
        print(f"bench.serve: {json.dumps(how)}", flush=True)
        servers: dict[str, list[dict[str, Any]]] = {"legonet": [], "mlflow": []}
        for round_ in range(args.rounds):  # alternate who goes first: the shared machine's load drifts
            for kind in list(servers) if round_ % 2 == 0 else list(servers)[::-1]:
                servers[kind].append(measure(kind, project, body, args, workdir))
    medians = {kind: {f"{phase}_{key}": statistics.median(r[phase][key] for r in runs)
                      for phase in ("closed", "open") for key in ("throughput_rps", "p50_ms", "p99_ms")}
               for kind, runs in servers.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"how": how, "servers": servers, "medians": medians}, indent=1) + "\n")
    print(f"\nmedians of {args.rounds} rounds:\n| server | closed loop: req/s | p50 ms | p99 ms | open loop at "
          f"{args.rate:g}/s: p50 ms | p99 ms | 1-min load average during its phases |")
    print("|---|---|---|---|---|---|---|")
    for kind, m in medians.items():
        loads = [r[phase][f"loadavg_1min_{when}"] for r in servers[kind] for phase in ("closed", "open")
                 for when in ("before", "after")]
        print(f"| {kind} | {m['closed_throughput_rps']:.1f} | {m['closed_p50_ms']:.0f} | {m['closed_p99_ms']:.0f} | "
              f"{m['open_p50_ms']:.0f} | {m['open_p99_ms']:.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
