"""DVC stage `evaluate`: test accuracy of the ensemble, per-class recall and adapter load (DVC metrics and plots)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts import adapter_load_schema, check_encoded, validate
from pipeline.dataset import read_embeddings, write_bytes_atomic
from pipeline.ensemble import load_ensemble
from pipeline.layout import ADAPTERS, ENCODED_TEST, KEYS, METRICS, PROJECTION
from pipeline.lineage import stage_run
from stages.project import load_params, run_stage


def write_json(path: Path, payload: dict) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def main() -> None:
    params = load_params()
    classes, k = list(params["data"]["classes"]), int(params["adapters"]["k"])
    test = ENCODED_TEST
    outputs = [METRICS / "evaluate.json", METRICS / "per_class.csv", METRICS / "adapter_load.csv"]
    with stage_run("evaluate", Path(), {"adapters.k": k, "data.classes": classes},
                   [test, PROJECTION, KEYS, ADAPTERS], outputs) as run:
        frame, embeddings = read_embeddings(test)
        check_encoded(frame, embeddings, test, classes, np.load(PROJECTION).shape[1])
        ensemble = load_ensemble(PROJECTION, KEYS, ADAPTERS, k, classes)
        proba, activated = ensemble.predict_proba(embeddings)
        predicted = np.asarray(classes)[proba.argmax(axis=1)]
        truth = frame["label"].to_numpy()
        accuracy = float((predicted == truth).mean()) if len(truth) else float("nan")
        recall = [float((predicted[truth == c] == c).mean()) if (truth == c).any() else float("nan")
                  for c in classes]
        infos = [json.loads(p.read_text()) for p in sorted(ADAPTERS.rglob("adapter-*.json"))]
        load = pd.DataFrame({
            "adapter": [i["adapter"] for i in infos],
            "train_samples": [i["train_samples"] for i in infos],
            "test_activations": [int((activated == i["adapter"]).sum()) for i in infos],
        })
        validate(load, adapter_load_schema(len(np.load(KEYS))), outputs[2])  # before any output is written
        METRICS.mkdir(exist_ok=True)
        pd.DataFrame({"label": classes, "recall": recall}).to_csv(outputs[1], index=False)
        load.to_csv(outputs[2], index=False)
        metrics = {"accuracy": round(accuracy, 6), "test_samples": len(truth),
                   "empty_adapters": int((load["train_samples"] == 0).sum()),
                   "max_adapter_load": int(load["train_samples"].max()),
                   "train_samples_routed": int(load["train_samples"].sum())}
        write_json(outputs[0], metrics)
        run.update(metrics)


if __name__ == "__main__":
    run_stage(main)
