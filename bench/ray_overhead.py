"""Ray overhead benchmark (issue 7): `executor: ray` vs `local` on this machine, and the cost model's projection.

Builds the same data twice in fresh projects (``executor: local``, then ``executor: ray`` with one local Ray for
the whole ``dvc repro``), forgets the same train sample in both, checks that the artifacts are identical, and
measures the constants of the cost model in docs/scale-out.md from the MLflow lineage of the two builds:

* ``o``: per-stage process overhead (stage wall time minus the stage body: Python start, imports, DVC);
* ``o_ray``: what Ray adds per Ray-using stage (connect, fresh workers with their imports, object transfers);
* ``R``: starting the local Ray; ``t_a``: training time per adapter sample-epoch; ``r``: encode throughput.

Then it projects build and forget times, and the speedup of ``ray`` over ``local``, on W workers for the measured
size and for a large one (N = 1,000,000 samples, n = 1,024 adapters, 64 partitions, 32 blocks).

    python -m bench.ray_overhead [--stride 5] [--set adapters.n=8 ...] [--out bench/results/ray_overhead.json]

``--stride 5`` takes every 5th bundled digit (1,000 samples) with the tests' TINY params; ``--stride 1`` is all
5,000. Needs Ray (``pip install '.[ray]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TINY = {"data.partitions": 2, "encoder.image_size": 32, "projection.dim": 32, "adapters.n": 4, "adapters.k": 2,
        "adapters.blocks": 2, "adapters.train.epochs": 8, "gate.min_accuracy": 0.5}
WORKERS = (1, 2, 4, 8, 16, 32, 64)
LARGE = {"N": 1_000_000, "n": 1024, "k": 3, "partitions": 64, "blocks": 32}


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result.stdout


def legonet(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli.main", *args]


def lineage(root: Path) -> list[dict[str, Any]]:
    """Every MLflow run of the project: name, parent flag, metrics, start time."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [{"name": r.info.run_name, "task": "mlflow.parentRunId" in r.data.tags, "metrics": r.data.metrics,
             "start": r.info.start_time} for r in client.search_runs(experiments, max_results=5000)]


def artifacts(root: Path) -> dict[str, str]:
    from pipeline.tracking.lineage import tree_digests

    found = tree_digests([root / "data", root / "models"], root)
    return {p: d for p, d in found.items() if p != "models/package/MLmodel" and not p.endswith((".dvc", ".gitignore"))}


def project(workdir: Path, name: str, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    root = workdir / name
    root.mkdir()
    run(legonet("init", ".", "--data", str(data), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]),
        root)
    env = {"RAY_ADDRESS": ""}
    build, _ = run(legonet("build"), root, env)
    runs = lineage(root)
    import pyarrow.parquet as pq

    ids = sorted(pq.read_table(root / "data/routing.parquet", columns=["sample_id"]).column(0).to_pylist())
    manifest = workdir / f"{name}.json"
    manifest.write_text(json.dumps({"request_id": "bench-1", "sample_ids": [ids[len(ids) // 3]], "reason": "bench",
                                    "received_at": "2026-01-01T00:00:00+00:00"}))
    forget, out = run(legonet("forget", str(manifest)), root, env)
    summary = json.loads(out.strip().splitlines()[-1])
    record = json.loads(subprocess.run(legonet("audit", "show", "bench-1"), cwd=root, capture_output=True,
                                       text=True, check=True).stdout)["predicate"]
    return {"root": root, "build_seconds": build, "forget_seconds": forget, "runs": runs,
            "forget_stages": record["stages_run"], "forget_timings": record["timings_seconds"],
            "retrained": summary.get("retrained_adapters"), "artifacts": artifacts(root)}


def ray_start_seconds() -> float:
    from pipeline.runner import executor

    started = time.perf_counter()
    with executor.cluster({"executor": "ray"}):
        up = time.perf_counter() - started
    return up


def constants(local: dict[str, Any], ray: dict[str, Any], settings: dict[str, Any], samples: int,
              ray_start: float) -> dict[str, float]:
    stages = [r for r in local["runs"] if not r["task"]]
    body = sum(r["metrics"].get("stage_seconds", 0.0) for r in stages)
    o = (local["build_seconds"] - body) / len(stages)
    encode = [r for r in stages if r["name"].startswith("encode@")]
    rate = sum(r["metrics"].get("samples", 0) for r in encode) / sum(r["metrics"]["stage_seconds"] for r in encode)
    train = [r for r in stages if r["name"].startswith("train@")]
    epochs, n, k = int(settings["adapters.train.epochs"]), int(settings["adapters.n"]), int(settings["adapters.k"])
    train_samples = k * samples * 0.7  # train split ~70 % of the data, each sample in k shards
    t_sample_epoch = sum(r["metrics"]["stage_seconds"] for r in train) / (train_samples * epochs)
    ray_stages = {r["name"]: r for r in ray["runs"] if not r["task"]}
    used = [s for s in ray_stages if s.startswith(("encode@", "train@"))]
    extra = sum(ray_stages[s]["metrics"]["stage_seconds"] for s in used) - sum(
        r["metrics"]["stage_seconds"] for r in stages if r["name"] in used)
    other = ray["build_seconds"] - local["build_seconds"] - ray_start - extra
    rest = sum(r["metrics"]["stage_seconds"] for r in stages if not r["name"].startswith(("encode@", "train@")))
    return {"o_stage_seconds": round(o, 3), "other_bodies_seconds_per_sample": rest / samples,
            "o_ray_stage_seconds": round((extra + other) / len(used), 3),
            "ray_start_seconds": round(ray_start, 3), "encode_samples_per_second": round(rate, 1),
            "train_seconds_per_sample_epoch": t_sample_epoch, "adapters": n,
            "train_seconds_per_adapter": round(t_sample_epoch * train_samples * epochs / n, 3)}


def model(c: dict[str, float], N: int, n: int, k: int, partitions: int, blocks: int, epochs: int, W: int | None,
          fixed: float) -> dict[str, float]:
    """The cost model of docs/scale-out.md: build and one-sample forget, local (W=None) or Ray on W workers."""
    stages = 6 + partitions + 2 + blocks
    per_adapter = c["train_seconds_per_sample_epoch"] * (k * 0.7 * N / n) * epochs
    m = math.ceil(n / blocks)  # adapters per block
    if W is None:
        build = stages * c["o_stage_seconds"] + N / c["encode_samples_per_second"] + n * per_adapter + fixed
        forget = (5 + min(k, blocks)) * c["o_stage_seconds"] + (0.7 * N / partitions) / c[
            "encode_samples_per_second"] + k * per_adapter + fixed
    else:
        ray_stages = partitions + 2 + blocks
        build = (c["ray_start_seconds"] + stages * c["o_stage_seconds"] + ray_stages * c["o_ray_stage_seconds"]
                 + N / (c["encode_samples_per_second"] * W) + blocks * math.ceil(m / W) * per_adapter + fixed)
        # one sample: its partition (encoded W-wide) and k adapters in up to k blocks (one task each)
        forget = (c["ray_start_seconds"] + 5 * c["o_stage_seconds"] + min(k, blocks) * (
                  c["o_stage_seconds"] + c["o_ray_stage_seconds"]) + c["o_ray_stage_seconds"]
                  + (0.7 * N / partitions) / (c["encode_samples_per_second"] * W) + k * per_adapter + fixed)
    return {"build_seconds": round(build, 1), "forget_seconds": round(forget, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stride", type=int, default=5, help="every s-th bundled digit (5: 1,000 samples)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TINY param")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ray_overhead.json"))
    args = parser.parse_args(argv)
    import yaml

    from pipeline.data.dataset import bundled_mnist, write_table

    settings = {**TINY, **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}}
    command = " ".join(["python -m bench.ray_overhead", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()}: "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="legonet-ray-") as tmp:
        work = Path(tmp)
        frame = bundled_mnist().iloc[::args.stride].reset_index(drop=True)
        write_table(frame, work / "samples.parquet")
        local = project(work, "local", work / "samples.parquet", settings)
        print(f"local: build {local['build_seconds']:.1f} s, forget {local['forget_seconds']:.1f} s", flush=True)
        ray = project(work, "ray", work / "samples.parquet", {**settings, "executor": "ray"})
        print(f"ray:   build {ray['build_seconds']:.1f} s, forget {ray['forget_seconds']:.1f} s", flush=True)
        same = local["artifacts"] == ray["artifacts"] and local["retrained"] == ray["retrained"]
        ray_start = ray_start_seconds()
    c = constants(local, ray, settings, len(frame), ray_start)
    epochs, n = int(settings["adapters.train.epochs"]), int(settings["adapters.n"])
    sizes = {"measured": {"N": len(frame), "n": n, "k": int(settings["adapters.k"]),
                          "partitions": int(settings["data.partitions"]), "blocks": int(settings["adapters.blocks"])},
             "large": LARGE}
    projection = {}
    for label, size in sizes.items():
        fixed = c["other_bodies_seconds_per_sample"] * size["N"]  # keys, assign, baseline, evaluate, package: O(N)
        base = model(c, **size, epochs=epochs if label == "measured" else 60, W=None, fixed=fixed)
        rows = {"local": base}
        for w in WORKERS:
            rows[f"W={w}"] = model(c, **size, epochs=epochs if label == "measured" else 60, W=w, fixed=fixed)
            rows[f"W={w}"]["build_speedup"] = round(base["build_seconds"] / rows[f"W={w}"]["build_seconds"], 2)
            rows[f"W={w}"]["forget_speedup"] = round(base["forget_seconds"] / rows[f"W={w}"]["forget_seconds"], 2)
        projection[label] = {"size": size, "rows": rows}
    build_cost = ray["build_seconds"] - local["build_seconds"]
    forget_cost = ray["forget_seconds"] - local["forget_seconds"]
    print(f"\nray vs local on {os.cpu_count()} cores ({len(frame)} samples, n={n}): build "
          f"{ray['build_seconds']:.1f} s vs {local['build_seconds']:.1f} s (+{build_cost:.1f} s, "
          f"x{ray['build_seconds'] / local['build_seconds']:.2f}); forget {ray['forget_seconds']:.1f} s vs "
          f"{local['forget_seconds']:.1f} s (+{forget_cost:.1f} s, "
          f"x{ray['forget_seconds'] / local['forget_seconds']:.2f}); artifacts identical: {same}")
    print("constants: " + ", ".join(f"{k}={v:.3g}" for k, v in c.items()))
    for label, block in projection.items():
        size = block["size"]
        print(f"projected ({label}: N={size['N']:,}, n={size['n']}, P={size['partitions']}, "
              f"blocks={size['blocks']}): local build {block['rows']['local']['build_seconds']:.0f} s, forget "
              f"{block['rows']['local']['forget_seconds']:.0f} s")
        for w in WORKERS:
            row = block["rows"][f"W={w}"]
            print(f"  W={w:>2}: build {row['build_seconds']:>9.0f} s ({row['build_speedup']:.2f}x)  forget "
                  f"{row['forget_seconds']:>7.0f} s ({row['forget_speedup']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "settings": settings, "samples": len(frame), "identical": same,
        "local": {k: local[k] for k in ("build_seconds", "forget_seconds", "forget_stages", "forget_timings")},
        "ray": {k: ray[k] for k in ("build_seconds", "forget_seconds", "forget_stages", "forget_timings")},
        "constants": c, "projection": projection}, indent=1, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
