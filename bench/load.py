"""``python -m bench.load``: an HTTP load generator for a scoring server's /invocations, run as its own process.

Open loop (``--rate R``): request i is due at ``start + i / R`` whatever the server does, so a slow answer cannot
slow the load down (latency is measured from when a request was due, queueing in the generator included: no
coordinated omission). Closed loop (``--concurrency C`` without ``--rate``): C clients send back to back, for peak
throughput. Each client thread keeps one HTTP/1.1 connection. It runs for ``--duration`` seconds or until
``--stop-file`` exists, then waits for every request in flight and writes one JSON: a record per request (due and
sent offsets, latency, status, the version and quarantine headers of `legonet serve`, the adapters each answer
names, the error) and a summary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

VERSION_HEADER = "X-Legonet-Model-Version"
QUARANTINE_HEADER = "X-Legonet-Quarantine"
IDLE = 4.0  # seconds a kept connection may idle: uvicorn closes one idle for 5 s, and a request sent as it does fails


class Client:
    """One connection per thread, opened again after any error or ``IDLE`` seconds unused; ``keep_alive=False``: a
    new connection for every request (a kept connection stays with one worker process of a multi-worker server)."""

    def __init__(self, url: str, body: bytes, timeout: float, keep_alive: bool = True) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.body, self.timeout, self.keep_alive, self.local = body, timeout, keep_alive, threading.local()

    def send(self, due: float, origin: float) -> dict[str, Any]:
        sent = time.monotonic()
        record: dict[str, Any] = {"due": round(due - origin, 4), "sent": round(sent - origin, 4)}
        try:
            connection = getattr(self.local, "connection", None)
            if connection is not None and sent - self.local.used_at > IDLE:
                connection.close()
                connection = None
            if connection is None:
                connection = self.local.connection = http.client.HTTPConnection(self.host, self.port,
                                                                               timeout=self.timeout)
            connection.request("POST", self.path, self.body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            record.update(status=response.status, version=response.getheader(VERSION_HEADER),
                          quarantine=response.getheader(QUARANTINE_HEADER))
            if response.status == 200:
                record["adapters"] = [row.get("adapters") for row in json.loads(payload)["predictions"]]
            else:
                record["error"] = payload[:300].decode("utf-8", "replace")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.local.connection = None
            record.update(status=None, error=f"{type(exc).__name__}: {exc}")
        done = self.local.used_at = time.monotonic()
        record["latency"] = round(done - due, 5)  # from when it was due: queueing in the generator counts
        record["service"] = round(done - sent, 5)
        if not self.keep_alive and (connection := getattr(self.local, "connection", None)) is not None:
            connection.close()
            self.local.connection = None
        return record


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(records: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency"] for r in ok]
    versions: list[str] = []
    for r in sorted(ok, key=lambda r: r["sent"]):
        if r.get("version") and (not versions or versions[-1] != r["version"]):
            versions.append(r["version"])
    return {"requests": len(records), "ok": len(ok), "failed": len(records) - len(ok), "seconds": round(elapsed, 3),
            "throughput_rps": round(len(ok) / elapsed, 2) if elapsed else None,
            "p50_ms": round(1000 * percentile(latencies, 0.50), 2) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2) if latencies else None,
            "versions_in_order": versions}


def run(url: str, body: bytes, rate: float | None, concurrency: int, duration: float, stop_file: Path | None,
        timeout: float = 60.0) -> dict[str, Any]:
    """Send the load; returns {"records": [...], "summary": {...}}."""
    client = Client(url, body, timeout)
    stopped = (lambda: stop_file.exists()) if stop_file is not None else (lambda: False)
    origin = time.monotonic()
    records: list[dict[str, Any]] = []
    if rate:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures, i = [], 0
            while (due := origin + i / rate) < origin + duration and not stopped():
                time.sleep(max(0.0, due - time.monotonic()))
                futures.append(pool.submit(client.send, due, origin))
                i += 1
            records = [f.result() for f in futures]
    else:
        lock, end = threading.Lock(), origin + duration

        def loop() -> None:
            while time.monotonic() < end and not stopped():
                record = client.send(time.monotonic(), origin)
                with lock:
                    records.append(record)

        threads = [threading.Thread(target=loop) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.monotonic() - origin
    records.sort(key=lambda r: r["due"])
    # origin: time.monotonic() when the load began (Linux: one clock for every process, so a caller can place
    # its own events among the records)
    return {"origin": origin, "records": records, "summary": summary(records, elapsed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--url", required=True, help="the /invocations URL")
    parser.add_argument("--body", type=Path, required=True, help="JSON request body sent with every request")
    parser.add_argument("--rate", type=float, help="requests per second (open loop); omit for a closed loop")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (connections)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds (at most, with --stop-file)")
    parser.add_argument("--stop-file", type=Path, help="stop sending once this file exists")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args(argv)
    result = run(args.url, args.body.read_bytes(), args.rate, args.concurrency, args.duration, args.stop_file)
    args.out.write_text(json.dumps(result))
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
