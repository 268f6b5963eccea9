"""Scale benchmark (issue 6): does a forget cost follow the work it touches, not the number of adapters?

Builds the default data at n = 32, 256 and 1,024 adapters (k = 3, the same ``adapters.blocks`` for all) in
fresh projects, one after the other, then measures in rounds: each round runs ``dvc status`` and a no-op
``dvc repro`` in every project, then ``legonet forget --profile`` of one random train sample in every project
(sizes in turn, so a change in the shared machine's load hits all sizes alike). Reports the median over the rounds
per size, the ratios against the smallest size, and every forget's phases; writes ``bench/results/scale.json``.

    python -m bench.scale [--sizes 32,256,1024] [--blocks 32] [--rounds 3] [--out bench/results/scale.json]

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
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench.project import PROFILE_LINE

TARGETS = {"forget": 1.5, "build": 3.0, "status": 3.0, "noop_repro": 3.0}


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def legonet(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.cli", *args]


def build(n: int, blocks: int, workdir: Path, extra: dict[str, str]) -> tuple[Path, float]:
    """`legonet init` + `legonet build` of the default data at n adapters: (project, build seconds)."""
    root = workdir / f"n{n}"
    settings = {"adapters.n": n, "adapters.k": 3, "adapters.blocks": blocks, "data.reference_fraction": 0.25,
                **extra}
    timed(legonet("init", str(root), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]), workdir)
    return root, timed(legonet("build"), root)[0]


def status_and_noop(root: Path) -> tuple[float, float]:
    """One `dvc status` and one no-op `dvc repro` (asserted to do nothing)."""
    status, _ = timed([sys.executable, "-m", "dvc", "status"], root)
    noop, out = timed([sys.executable, "-m", "dvc", "repro"], root)
    assert "up to date" in out, out
    return status, noop


def forget_one(root: Path, n: int, rng: random.Random, request: int) -> dict[str, object]:
    """`legonet forget --profile` of one random train sample: wall time, phases, adapters retrained."""
    import pyarrow.parquet as pq

    ids = sorted(pq.read_table(root / "data/routing.parquet", columns=["sample_id"]).column(0).to_pylist())
    manifest = root.parent / f"forget-n{n}-{request}.json"
    manifest.write_text(json.dumps({"request_id": f"scale-{n}-{request}", "sample_ids": [rng.choice(ids)],
                                    "reason": "benchmark",
                                    "received_at": datetime.now(UTC).isoformat(timespec="seconds")}))
    seconds, out = timed(legonet("forget", "--profile", str(manifest)), root)
    phases = {m.group(1): float(m.group(2)) for m in map(PROFILE_LINE.match, out.splitlines()) if m}
    summary = json.loads(out.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "retrained_adapters": summary.get("retrained_adapters"),
            "phases": phases, "load_average": [round(v, 2) for v in os.getloadavg()]}


def measure(sizes: list[int], blocks: int, workdir: Path, seed: int, rounds: int, extra: dict[str, str],
            say: Callable[[str], None]) -> list[dict[str, object]]:
    """Build every size, then measure in rounds that visit every size in turn, so a change in the machine's load
    hits all sizes alike; each figure is the median over the rounds."""
    roots, builds = {}, {}
    for n in sizes:
        roots[n], builds[n] = build(n, blocks, workdir, extra)
        say(f"n={n}: built in {builds[n]:.1f} s")
    checks: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    forgets: dict[int, list[dict[str, object]]] = {n: [] for n in sizes}
    rngs = {n: random.Random(f"{seed}-{n}") for n in sizes}
    for request in range(rounds):
        for n in sizes:
            checks[n].append(status_and_noop(roots[n]))
        for n in sizes:
            forgets[n].append(forget_one(roots[n], n, rngs[n], request))
            say(f"round {request + 1}/{rounds}, n={n}: forget {forgets[n][-1]['seconds']} s, adapters "
                f"{forgets[n][-1]['retrained_adapters']}")
    return [{"n": n, "blocks": blocks, "build_seconds": round(builds[n], 2),
             "status_seconds": round(statistics.median(s for s, _ in checks[n]), 2),
             "noop_repro_seconds": round(statistics.median(x for _, x in checks[n]), 2),
             "forget_seconds": round(statistics.median(f["seconds"] for f in forgets[n]), 2),
             "status_and_noop_runs": [[round(s, 2), round(x, 2)] for s, x in checks[n]], "forgets": forgets[n],
             "files": {d: sum(1 for p in (roots[n] / d).rglob("*") if p.is_file()) for d in ("data", "models")}}
            for n in sizes]


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated adapter counts, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"adapter counts must be at least 1, got {text!r}")
    return sizes


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=[32, 256, 1024], help="comma-separated, e.g. 32,256,1024")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="forgets (and status/no-op checks) per size")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--set", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                        help="extra params for every project (e.g. a smaller encoder.image_size for a quick look)")
    args = parser.parse_args(argv)
    sizes = args.sizes
    command = " ".join(["python -m bench.scale", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()}: "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="legonet-scale-") as tmp:
        extra = dict(args.set)
        rows = measure(sizes, args.blocks, Path(tmp), args.seed, args.rounds, extra, lambda m: print(m, flush=True))
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "forgets"}), flush=True)
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
