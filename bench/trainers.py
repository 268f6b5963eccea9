"""Adapter optimisers side by side (issue 11): accuracy and training time of Adam and L-BFGS on the bench grid.

For each dataset and LegoNet cell (n, k), both trainers build every adapter on the same projected features, keys
and shards (``bench.systems.LegoNet``), in one process, alternating per cell so a change in the shared machine's
load hits both alike. Reports test accuracy (per seed) and the build's wall and CPU seconds; CPU seconds are what the
work costs without the other load (training is single-threaded). Adam's seeds change its minibatch order and
initial weights; L-BFGS reaches the optimum of a convex objective, so its seeds agree up to the gradient tolerance.

    python -m bench.trainers [--datasets mnist5k,fashion70k] [--cells 32:3,100:3] [--seeds 2]

Writes ``bench/results/trainers.json`` and prints a Markdown table (docs/adapter-training.md holds the last one).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.run import Runner
from bench.setting import MODES, REPO, load, machine, versions
from bench.systems import LegoNet, nearest_keys
from pipeline.model.adapters import TrainParams
from pipeline.model.keys import fit_keys

# Adam as every release before issue 11 trained adapters; L-BFGS as params.yaml trains them now.
TRAINERS = {
    "adam": {"optimizer": "adam", "epochs": 60, "lr": 0.003, "batch_size": 32, "weight_decay": 1e-4},
    "lbfgs": {"optimizer": "lbfgs", "iterations": 200, "weight_decay": 1e-4},
}


def measure(dataset: str, cells: list[tuple[int, int]], seeds: int, runner: Runner) -> list[dict]:
    features, info = runner.features(dataset)
    runner.say(f"{dataset}: {info['train']} train samples, {info['test']} test")
    kp = runner.params["keys"]
    rows = []
    for n, k in cells:
        keys = fit_keys(features.reference_x, n, int(kp["seed"]), int(kp["iterations"]))
        nearest = nearest_keys(features, keys, k)
        for name, settings in TRAINERS.items():
            params = TrainParams(**{**settings, "threads": 1})
            accuracy, wall, cpu = [], [], []
            for seed in range(seeds):
                system = LegoNet(features, params, seed, keys, k, nearest)
                wall.append(system.build())
                cpu.append(system.build_cpu)
                accuracy.append(system.accuracy())
            row = {"dataset": dataset, "n": n, "k": k, "trainer": name, "params": asdict(params),
                   "accuracy": accuracy, "accuracy_mean": float(np.mean(accuracy)),
                   "build_seconds": wall, "build_cpu_seconds": cpu, "heads": n,
                   "mean_head_rows": float(np.mean([len(r) for r in system.rows])), "load": load()}
            rows.append(row)
            runner.say(f"  n={n} k={k} {name:<6} accuracy {row['accuracy_mean']:.4f} {accuracy}  build "
                       f"{np.mean(wall):.1f} s wall, {np.mean(cpu):.1f} s CPU")
    return rows


def table(rows: list[dict]) -> str:
    """One line per (dataset, n, k): both trainers' accuracy and CPU seconds, and the speed-up."""
    lines = ["| data | n | k | rows/adapter | Adam accuracy | L-BFGS accuracy | Adam build CPU s | "
             "L-BFGS build CPU s | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    cells = sorted({(r["dataset"], r["n"], r["k"]) for r in rows}, key=lambda c: (c[0], c[1], c[2]))
    for dataset, n, k in cells:
        adam, lbfgs = (next(r for r in rows if (r["dataset"], r["n"], r["k"], r["trainer"]) == (dataset, n, k, t))
                       for t in ("adam", "lbfgs"))
        a_cpu, l_cpu = np.mean(adam["build_cpu_seconds"]), np.mean(lbfgs["build_cpu_seconds"])
        lines.append(f"| {dataset} | {n} | {k} | {adam['mean_head_rows']:.0f} | {adam['accuracy_mean']:.4f} | "
                     f"{lbfgs['accuracy_mean']:.4f} | {a_cpu:.1f} | {l_cpu:.1f} | {a_cpu / l_cpu:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trainers", description=__doc__)
    parser.add_argument("--datasets", default="mnist5k")
    parser.add_argument("--cells", default="16:1,16:3,32:3,100:1,100:3,100:10,256:3", help="n:k,...")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "trainers.json")
    args = parser.parse_args(argv)
    cells = [(int(n), int(k)) for n, k in (c.split(":") for c in args.cells.split(","))]

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    runner = Runner(MODES["full"], args.cache, say)
    rows = [row for dataset in args.datasets.split(",") for row in measure(dataset, cells, args.seeds, runner)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "versions": versions(), "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
