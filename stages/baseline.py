"""DVC stage `baseline`: one linear probe on all train samples' projected features: the frozen-encoder ceiling.

Only its test accuracy is kept (no weights), so this number carries no residue of deleted samples beyond itself.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

import numpy as np

from pipeline.adapters import TrainParams, adapter_proba, adapter_seed, train_adapter
from pipeline.contracts import check_encoded
from pipeline.dataset import read_embeddings
from pipeline.keys import project
from pipeline.layout import ENCODED_TEST, ENCODED_TRAIN, METRICS, PROJECTION
from pipeline.lineage import stage_run
from stages.evaluate import write_json
from stages.project import load_params, run_stage


def main() -> None:
    params = load_params()
    classes, base = list(params["data"]["classes"]), params["baseline"]
    threads = int(params["adapters"]["train"]["threads"])
    test = ENCODED_TEST
    used = {"baseline": base, "adapters.train.threads": threads, "data.classes": classes}
    with stage_run("baseline", Path(), used, [ENCODED_TRAIN, test, PROJECTION],
                   [METRICS / "baseline.json"]) as run:
        projection = np.load(PROJECTION)
        width = projection.shape[1]
        parts = [read_embeddings(p) for p in sorted(ENCODED_TRAIN.glob("part-*.parquet"))]
        for path, (frame, embeddings) in zip(sorted(ENCODED_TRAIN.glob("part-*.parquet")), parts, strict=True):
            check_encoded(frame, embeddings, path, classes, width)
        test_frame, test_embeddings = read_embeddings(test)
        check_encoded(test_frame, test_embeddings, test, classes, width)
        labels = np.concatenate([f["label"].to_numpy() for f, _ in parts])
        features = project(np.concatenate([e for _, e in parts]), projection)
        index = {c: i for i, c in enumerate(classes)}
        train = TrainParams(hidden=0, threads=threads, **base)
        weights = train_adapter(features, np.array([index[c] for c in labels]), len(classes),
                                adapter_seed(0, -1), train)
        proba = adapter_proba(weights, project(test_embeddings, projection))
        accuracy = float((np.asarray(classes)[proba.argmax(axis=1)] == test_frame["label"].to_numpy()).mean())
        METRICS.mkdir(exist_ok=True)
        write_json(METRICS / "baseline.json", {"probe_accuracy": round(accuracy, 6), "train_samples": len(labels)})
        run["probe_accuracy"] = accuracy


if __name__ == "__main__":
    run_stage(main)
