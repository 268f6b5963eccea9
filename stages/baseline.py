"""DVC stage `baseline`: the reference linear probe on all train samples' projected features (``pipeline.model.probe``).

Only its test accuracy is kept as a figure (no weights). The probe is solved in closed form from sufficient
statistics computed per adapter shard: every train sample sits in exactly ``adapters.k`` shards, so the sum over
shards is k times the statistics of the train set, and the ridge penalty scales with the row count, so the
probe is the one fitted on each sample once. The shards already hold projected features, and a forget rewrites
only the k shards of the adapters it retrains, so a rerun recomputes the statistics of those shards only (kept
in ``reports/probe/``, a `persist` output, with the md5 of the shard they came from and the stage's code entry,
``pipeline.project.code``). The test split is scored on
the projected features the `evaluate` stage keeps. ``metrics/baseline.json`` is byte-identical to a from-scratch
run; the statistics of a shard are rewritten whenever the shard changes, so none derived from a forgotten sample
survives (and the forget's purge deletes their old versions from the DVC cache). The statistics are built on
only when the directory is exactly what ``dvc.lock`` records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save

from pipeline.data.contracts import check_encoded
from pipeline.data.dataset import read_embeddings, write_bytes_atomic
from pipeline.model.probe import fit_probe, probe_predict, probe_statistics
from pipeline.project.code import check_code
from pipeline.project.layout import METRICS, PROBE, SHARDS, TEST_POINTS, probe_path, shard_path
from pipeline.project.params import load_params, recorded_md5, run_stage
from pipeline.tracking.lineage import dvc_digest, file_md5, stage_run
from stages.evaluate import write_json


def shard_statistics(adapter: int, shard: Path, classes: list[int], code: dict[str, str], trusted: bool
                     ) -> dict[str, np.ndarray]:
    """The statistics of one shard: kept when computed from the same shard bytes by the same code, else computed
    and written (safetensors with one sorted-JSON metadata key: byte-stable)."""
    path, source = probe_path(adapter), {"shard_md5": file_md5(shard), "classes": classes, "code": code}
    if trusted and path.is_file():
        with safe_open(path, "numpy") as handle:
            if json.loads((handle.metadata() or {}).get("legonet", "{}")) == source:
                return load_file(path)
    frame, features = read_embeddings(shard)
    check_encoded(frame, features, shard, classes, None)
    lookup = {c: i for i, c in enumerate(classes)}
    statistics = probe_statistics(features, np.array([lookup[c] for c in frame["label"]], dtype=np.int64),
                                  len(classes))
    write_bytes_atomic(path, save(statistics, metadata={"legonet": json.dumps(source, sort_keys=True)}))
    return statistics


def main() -> None:
    params = load_params()
    code = check_code(params, "baseline")
    classes, ridge = list(params["data"]["classes"]), float(params["baseline"]["ridge"])
    n, k, blocks = int(params["adapters"]["n"]), int(params["adapters"]["k"]), int(params["adapters"]["blocks"])
    used = {"baseline": params["baseline"], "data.classes": classes, "adapters.n": n, "adapters.k": k,
            "adapters.blocks": blocks, "code": code}
    with stage_run("baseline", Path(), used, [SHARDS, TEST_POINTS], [METRICS / "baseline.json", PROBE]) as run:
        trusted = PROBE.is_dir() and recorded_md5(PROBE) == dvc_digest(PROBE, Path())
        statistics = [shard_statistics(j, shard_path(j, n, blocks), classes, code, trusted) for j in range(n)]
        for stray in sorted(set(PROBE.iterdir()) - {probe_path(j) for j in range(n)}):
            stray.unlink()  # adapters that no longer exist, stale temp files
        test, points = read_embeddings(TEST_POINTS)
        check_encoded(test, points, TEST_POINTS, classes, None)
        predicted = np.asarray(classes)[probe_predict(fit_probe(statistics, ridge), points)]
        accuracy = float((predicted == test["label"].to_numpy()).mean()) if len(predicted) else float("nan")
        train_samples = sum(int(s["count"][0]) for s in statistics) // k  # each sample sits in k shards
        METRICS.mkdir(exist_ok=True)
        write_json(METRICS / "baseline.json", {"probe_accuracy": round(accuracy, 6), "train_samples": train_samples})
        run["probe_accuracy"] = accuracy


if __name__ == "__main__":
    run_stage(main)
