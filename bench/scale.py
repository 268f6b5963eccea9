"""Scale benchmark (issue 6): does a forget cost follow the work it touches, not the number of adapters?

Builds the default data at n = 32, 256 and 1,024 adapters (k = 3, the same ``adapters.blocks`` for all) in
fresh projects, one after the other in one run, and times: the initial ``legonet build``, ``dvc status`` and a
no-op ``dvc repro`` afterwards (median of 3 runs each), and ``legonet forget`` of one random train sample (with the
time of each of its phases and DVC stages). Prints the ratios against
n = 32 and writes ``bench/results/scale.json``.

    python -m bench.scale [--sizes 32,256,1024] [--blocks 32] [--out bench/results/scale.json]

The reference split is raised to 25 % of the data for every size, because n keys need n reference samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.project import PROFILE_LINE

TARGETS = {"forget": 1.5, "build": 3.0, "status": 3.0, "noop_repro": 3.0}
REPEATS = 3


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def legonet(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *args]


def measure(n: int, blocks: int, workdir: Path, seed: int) -> dict[str, object]:
    root = workdir / f"n{n}"
    settings = {"adapters.n": n, "adapters.k": 3, "adapters.blocks": blocks, "data.reference_fraction": 0.25}
    timed(legonet("init", str(root), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]), workdir)
    build, _ = timed(legonet("build"), root)
    # median of REPEATS: one run of a few seconds on a shared 2-core machine is mostly noise
    status = statistics.median(timed([sys.executable, "-m", "dvc", "status"], root)[0] for _ in range(REPEATS))
    noops = [timed([sys.executable, "-m", "dvc", "repro"], root) for _ in range(REPEATS)]
    assert all("up to date" in out for _, out in noops), noops
    noop = statistics.median(seconds for seconds, _ in noops)
    import pyarrow.parquet as pq

    ids = sorted(pq.read_table(root / "data/routing.parquet", columns=["sample_id"]).column(0).to_pylist())
    sample = random.Random(seed).choice(ids)
    manifest = root.parent / f"forget-n{n}.json"
    manifest.write_text(json.dumps({"request_id": f"scale-{n}", "sample_ids": [sample], "reason": "benchmark",
                                    "received_at": datetime.now(UTC).isoformat(timespec="seconds")}))
    forget, out = timed(legonet("forget", "--profile", str(manifest)), root)
    phases = {m.group(1): float(m.group(2)) for m in map(PROFILE_LINE.match, out.splitlines()) if m}
    summary = json.loads(out.strip().splitlines()[-1])
    return {"n": n, "blocks": blocks, "build_seconds": round(build, 2), "status_seconds": round(status, 2),
            "noop_repro_seconds": round(noop, 2), "forget_seconds": round(forget, 2),
            "retrained_adapters": summary.get("retrained_adapters"), "forget_phases": phases,
            "files": {d: sum(1 for p in (root / d).rglob("*") if p.is_file()) for d in ("data", "models")},
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,256,1024")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    command = " ".join(["python -m bench.scale", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()}: "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="legonet-scale-") as tmp:
        for n in sizes:
            row = measure(n, args.blocks, Path(tmp), args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]
    ratios = {f"n={r['n']}": {k: round(r[f"{k}_seconds"] / base[f"{k}_seconds"], 2) for k in TARGETS}
              for r in rows}
    largest = ratios[f"n={rows[-1]['n']}"]
    verdict = {k: {"ratio": largest[k], "target": t, "met": largest[k] <= t} for k, t in TARGETS.items()}
    print(f"\nratios against n={base['n']} (targets for n={rows[-1]['n']}: forget <= 1.5, build/status/no-op <= 3)")
    for name, values in ratios.items():
        print(f"  {name:>7}: " + "  ".join(f"{k} {v:.2f}x" for k, v in values.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                                    "cpus": os.cpu_count(), "rows": rows, "ratios": ratios, "verdict": verdict},
                                   indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(v["met"] for v in verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
