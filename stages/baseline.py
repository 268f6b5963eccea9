"""DVC stage `baseline`: the reference linear probe on all train samples' projected features (``pipeline.probe``).

Only its test accuracy is kept as a figure (no weights). The probe is solved in closed form from per-partition
sufficient statistics, kept in ``reports/probe/`` (a `persist` output) with the md5 of the encoded partition and
of the projection they came from: a rerun recomputes the statistics of the changed partitions only (a forget:
one), so its cost follows the request, and ``metrics/baseline.json`` is byte-identical to a from-scratch run. The
statistics of a partition are rewritten whenever the partition changes, so none derived from a forgotten sample
survives (and the forget's purge deletes their old versions from the DVC cache). The directory is built on only
when it is exactly what ``dvc.lock`` records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from pipeline.contracts import check_encoded
from pipeline.dataset import read_embeddings, write_bytes_atomic
from pipeline.keys import project
from pipeline.layout import ENCODED_TEST, ENCODED_TRAIN, METRICS, PROBE, PROJECTION, encoded_path, probe_path
from pipeline.lineage import dvc_digest, file_md5, stage_run
from pipeline.probe import fit_probe, probe_predict, probe_statistics
from stages.evaluate import write_json
from stages.project import load_params, recorded_md5, run_stage


def partition_statistics(index: int, source: dict[str, str], classes: list[int], projection: np.ndarray,
                         trusted: bool) -> dict[str, np.ndarray]:
    """The statistics of encoded partition ``index``: kept when computed from the same partition and projection,
    else computed and written (safetensors with one sorted-JSON metadata key: byte-stable)."""
    path = probe_path(index)
    if trusted and path.is_file():
        from safetensors import safe_open

        with safe_open(path, "numpy") as handle:
            if json.loads((handle.metadata() or {}).get("legonet", "{}")) == source:
                return load_file(path)
    frame, embeddings = read_embeddings(encoded_path(index))
    check_encoded(frame, embeddings, encoded_path(index), classes, projection.shape[1])
    lookup = {c: i for i, c in enumerate(classes)}
    statistics = probe_statistics(project(embeddings, projection), np.array([lookup[c] for c in frame["label"]],
                                                                            dtype=np.int64), len(classes))
    write_bytes_atomic(path, save(statistics, metadata={"legonet": json.dumps(source, sort_keys=True)}))
    return statistics


def main() -> None:
    params = load_params()
    classes, ridge = list(params["data"]["classes"]), float(params["baseline"]["ridge"])
    partitions = int(params["data"]["partitions"])
    test = ENCODED_TEST
    used = {"baseline": params["baseline"], "data.classes": classes, "data.partitions": partitions}
    with stage_run("baseline", Path(), used, [ENCODED_TRAIN, test, PROJECTION],
                   [METRICS / "baseline.json", PROBE]) as run:
        projection = np.load(PROJECTION)
        trusted = PROBE.is_dir() and recorded_md5(PROBE) == dvc_digest(PROBE, Path())
        projection_md5 = file_md5(PROJECTION)
        statistics = [partition_statistics(i, {"encoded_md5": file_md5(encoded_path(i)), "projection_md5":
                                               projection_md5, "classes": classes}, classes, projection, trusted)
                      for i in range(partitions)]
        for stray in sorted(set(PROBE.iterdir()) - {probe_path(i) for i in range(partitions)}):
            stray.unlink()  # partitions that no longer exist, stale temp files
        test_frame, test_embeddings = read_embeddings(test)
        check_encoded(test_frame, test_embeddings, test, classes, projection.shape[1])
        weights = fit_probe(statistics, ridge)
        predicted = np.asarray(classes)[probe_predict(weights, project(test_embeddings, projection))]
        accuracy = float((predicted == test_frame["label"].to_numpy()).mean()) if len(predicted) else float("nan")
        train_samples = sum(int(s["count"][0]) for s in statistics)
        METRICS.mkdir(exist_ok=True)
        write_json(METRICS / "baseline.json", {"probe_accuracy": round(accuracy, 6), "train_samples": train_samples})
        run["probe_accuracy"] = accuracy


if __name__ == "__main__":
    run_stage(main)
