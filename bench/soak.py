"""Soak benchmark: many sequential single-sample forgets through the CLI, as a team serving requests would run them.

``legonet init --data`` on the default 5k digits, ``legonet build``, then ``--requests`` forgets of one random train
sample each (``legonet forget``, one manifest per request, in sequence). Checks that the time per request does not
grow over the run (median of the first 20 against the last 20), shows the size of the audit record each forget
writes (first, last, largest), and that, at the end, every artifact that decides a prediction is bit-identical to a
fresh ``legonet init`` + ``legonet build`` on the retained samples (docs/design.md section 2; the package's MLmodel
differs only in MLflow's own metadata and is left out). Not run in CI: about 35 minutes on 2 cores.
Writes ``bench/results/soak.json``.

    python -m bench.soak [--requests 200] [--data mnist5k] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.scale import _setting, build, dataset_frame, forget, train_ids
from pipeline.audit.keyring import RECORDS
from pipeline.data.dataset import read_table, write_table
from pipeline.data.salt import secret_path
from pipeline.runner.outputs import artifact_digests

WINDOW = 20
# Raw inputs are compared too (hash-carved, byte-deterministic); MLmodel carries MLflow's uuid and creation time.
VOLATILE = ("models/package/MLmodel",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    parser.add_argument("--set", action="append", type=_setting, default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.requests < 2 * WINDOW:
        parser.error(f"--requests must be at least {2 * WINDOW} (first {WINDOW} against last {WINDOW})")
    command = " ".join(["python -m bench.soak", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()}: "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    settings = dict(args.set)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="legonet-soak-") as tmp:
        work = Path(tmp)
        frame = dataset_frame(args.data)
        write_table(frame, work / "data.parquet")
        root = work / "project"
        build_seconds = build(work / "data.parquet", root, settings)
        print(f"built in {build_seconds:.1f} s", flush=True)
        forgets = []
        for request in range(args.requests):
            forgets.append(forget(root, rng.sample(train_ids(root), 1), f"soak-{request:04d}"))
            forgets[-1]["record_bytes"] = (root / RECORDS / f"{request + 1:06d}-soak-{request:04d}.json").stat().st_size
            if request % 10 == 9:
                print(f"{request + 1}/{args.requests}: last {forgets[-1]['seconds']} s", flush=True)
        retained = read_table(root / "data/routing.parquet")["sample_id"]
        removed = set(frame["sample_id"]) - set(retained) - set(read_table(root / "data/test/test.parquet")[
            "sample_id"]) - set(read_table(root / "data/reference/reference.parquet")["sample_id"])
        write_table(frame[~frame["sample_id"].isin(removed)].reset_index(drop=True), work / "retained.parquet")
        fresh_seconds = build(work / "retained.parquet", work / "fresh", settings, secret=secret_path(root))
        soaked, fresh = artifact_digests(root), artifact_digests(work / "fresh")
        differ = sorted(p for p in set(soaked) | set(fresh)
                        if p not in VOLATILE and soaked.get(p) != fresh.get(p))
    first = statistics.median(f["seconds"] for f in forgets[:WINDOW])
    last = statistics.median(f["seconds"] for f in forgets[-WINDOW:])
    result = {"command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "requests": args.requests, "forgotten_train_samples": len(removed), "build_seconds": round(
                  build_seconds, 2), "fresh_build_seconds": round(fresh_seconds, 2),
              f"median_first_{WINDOW}_seconds": round(first, 2), f"median_last_{WINDOW}_seconds": round(last, 2),
              "growth": round(last / first, 3), "phase_growth": phase_growth(forgets),
              "artifacts_compared": len(soaked),
              "record_bytes_first": forgets[0]["record_bytes"], "record_bytes_last": forgets[-1]["record_bytes"],
              "record_bytes_max": max(f["record_bytes"] for f in forgets),
              "bit_identical_to_fresh_build": not differ, "differing_artifacts": differ[:50], "forgets": forgets}
    print(json.dumps({k: v for k, v in result.items() if k != "forgets"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0 if not differ else 1


def phase_growth(forgets: list[dict[str, object]], top: int = 6) -> dict[str, list[float]]:
    """Where the time per request went from the first to the last ``WINDOW`` requests: the median seconds of each
    phase every request ran, in both windows, the ``top`` that grew most first (a flat soak shows none growing)."""
    shared = set.intersection(*(set(f["phases"]) for f in forgets))
    medians = {phase: [round(statistics.median(f["phases"][phase] for f in window), 3)
                       for window in (forgets[:WINDOW], forgets[-WINDOW:])] for phase in shared}
    return dict(sorted(medians.items(), key=lambda item: item[1][0] - item[1][1])[:top])


if __name__ == "__main__":
    sys.exit(main())
