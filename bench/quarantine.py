"""Accuracy of the quarantined model against the full one (issue 23): ``python -m bench.quarantine``.

On the default data (the bundled MNIST digits, encoded by the pipeline's encoder with the default params: the
same embeddings, keys and adapters as a default build), for 1, 10 and 100 pending requests of one random train
sample each: the adapters they activate are quarantined (``Ensemble.predict_proba(..., quarantine)``, what a
server answers with until the batch retrains) and the test accuracy is compared with the full model's and with
the model after the exact forget (those adapters retrained without the samples). Several random draws per count;
``--n`` adds settings with more adapters (a quarantine covers a smaller share of them). Accuracy only: no timing,
so a busy machine does not change a figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.run import Runner
from bench.setting import MODES, REPO
from bench.systems import LegoNet, nearest_keys
from pipeline.model.keys import fit_keys


def measure(system: LegoNet, counts: list[int], draws: int, seed: int) -> list[dict]:
    """Per count of pending requests: the share of adapters quarantined, the share of test samples whose answer
    consulted one, and the accuracies of the full, quarantined and retrained models (mean, min, max of draws)."""
    features = system.features
    full = system.accuracy()
    _, routed = system.ensemble(system.weights).predict_proba(features.test_x)
    rng = np.random.default_rng(seed)
    rows = []
    for count in counts:
        found: dict[str, list[float]] = {"adapters": [], "rerouted": [], "quarantined": [], "retrained": []}
        for _ in range(draws):
            requests = rng.choice(len(features.train_y), size=count, replace=False)
            quarantine = system.affected(requests)
            found["adapters"].append(len(quarantine) / len(system.rows))
            found["rerouted"].append(float(np.isin(routed, quarantine).any(axis=1).mean()))
            try:
                proba, _ = system.ensemble(system.weights).predict_proba(features.test_x, quarantine)
                found["quarantined"].append(float((proba.argmax(axis=1) == features.test_y).mean()))
            except ValueError:  # every trained adapter is quarantined: the model cannot answer until retrained
                found["quarantined"].append(float("nan"))
            alive = np.ones(len(features.train_y), dtype=bool)
            alive[requests] = False
            retrained, _ = system.retrain(quarantine, alive)
            found["retrained"].append(system.accuracy({**system.weights, **retrained}))
        rows.append({"requests": count, "full": full, **{k: _stats(v) for k, v in found.items()}})
    return rows


def _stats(values: list[float]) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    return {"mean": float(np.mean(finite)) if finite else None, "min": min(finite) if finite else None,
            "max": max(finite) if finite else None, "unanswerable": len(values) - len(finite), "draws": len(values)}


def table(results: list[dict]) -> str:
    lines = ["| n | k | pending requests | adapters quarantined | test answers rerouted | full | quarantined "
             "(min-max) | after the batch retrain |", "|---|---|---|---|---|---|---|---|"]
    for setting in results:
        for r in setting["rows"]:
            q = r["quarantined"]
            shown = "cannot answer" if q["mean"] is None else f"{q['mean']:.4f} ({q['min']:.4f}-{q['max']:.4f})"
            if q["unanswerable"] and q["mean"] is not None:
                shown += f"; {q['unanswerable']}/{q['draws']} draws cannot answer"
            lines.append(f"| {setting['n']} | {setting['k']} | {r['requests']} | {r['adapters']['mean']:.0%} | "
                         f"{r['rerouted']['mean']:.0%} | {r['full']:.4f} | {shown} | {r['retrained']['mean']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quarantine", description=__doc__)
    parser.add_argument("--dataset", default="mnist5k", help="a bench dataset (default: the default data)")
    parser.add_argument("--counts", default="1,10,100", help="numbers of pending one-sample requests")
    parser.add_argument("--draws", type=int, default=5, help="random draws of the requests per count")
    parser.add_argument("--n", default="", help="adapter counts besides the default params' (comma-separated)")
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "quarantine.json")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    runner = Runner(MODES["full"], args.cache, say)
    features, info = runner.features(args.dataset)
    adapters, keys_params = runner.params["adapters"], runner.params["keys"]
    k = int(adapters["k"])
    results = []
    for n in [int(adapters["n"]), *(int(v) for v in args.n.split(",") if v)]:
        keys = fit_keys(features.reference_x, n, int(keys_params["seed"]), int(keys_params["iterations"]))
        system = LegoNet(features, runner.adapter_params, int(adapters["seed"]), keys, k,
                         nearest_keys(features, keys, k))
        say(f"training {n} adapters (k={k}) on {len(features.train_y)} samples")
        system.build()
        results.append({"n": n, "k": k, "rows": measure(system, [int(c) for c in args.counts.split(",")],
                                                        args.draws, seed=0)})
        say(table(results))
    out = {"command": "python -m bench.quarantine " + " ".join(argv if argv is not None else sys.argv[1:]),
           "dataset": args.dataset, "data": {k: info[k] for k in ("samples", "train", "test", "encoder", "image_size")},
           "optimizer": runner.adapter_params.optimizer, "results": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(table(results))
    print(f"\n(run: `{out['command']}`; results in {args.output})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
