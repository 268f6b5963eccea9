"""DVC stage `evaluate`: test accuracy of the ensemble and per-class recall (DVC metrics and plots, in git), and the
load of each adapter (``reports/evaluate/adapter_load.csv``, a DVC output: in git its diff would name the adapters a
forget retrained).

Incremental (docs/design.md section 4, cost rule): an adapter's softmax output for a test sample depends on that
sample's projected features and the adapter's weights alone, so the stage keeps them in ``reports/evaluate/`` (a
`persist` output): the projected test features, keyed by sample_id and payload digest under the projection's md5,
and one table per adapter of its outputs for the test samples that activate it, keyed by the adapter's weights
digest, and the adapters each test sample activates (``test-routing.parquet``), keyed by the keys, k and the usable
adapters; all under the stage's code entry (``pipeline.project.code``). A rerun projects and routes only new test
samples and scores again only the samples whose adapter was retrained (or that newly activate an adapter);
``metrics/*`` are byte-identical to a full evaluation. The kept outputs are used only when the directory is exactly
what ``dvc.lock`` records; test samples that leave the test split leave these tables too. Each kept table also names
its source (the test split's md5, and for the adapters' tables how the split was routed): one made from the same
source is reused without comparing its rows (``kept``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file

from pipeline.data.contracts import adapter_load_schema, check_encoded, validate
from pipeline.data.dataset import (
    PAYLOAD_DIGEST,
    read_embeddings,
    read_metadata,
    read_table,
    reusable_rows,
    write_bytes_atomic,
    write_embeddings,
    write_table,
)
from pipeline.model.adapters import adapter_proba
from pipeline.model.ensemble import mean_proba
from pipeline.model.keys import project
from pipeline.model.routing import route
from pipeline.project.code import check_code
from pipeline.project.layout import (
    ADAPTER_LOAD,
    ADAPTERS,
    ENCODED_TEST,
    EVALUATION,
    KEYS,
    METRICS,
    PROJECTION,
    TEST_POINTS,
    adapter_index,
    adapter_name,
)
from pipeline.project.params import load_params, recorded_md5, run_stage
from pipeline.tracking.lineage import dvc_digest, file_md5, stage_run

# the adapters each test sample activates: only this stage reads it (declared here, not in the layout that every
# stage's code digest covers)
TEST_ROUTING = EVALUATION / "test-routing.parquet"


def write_json(path: Path, payload: dict) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def kept(path: Path, trusted: bool, identity: dict[str, Any], rows: pd.DataFrame, source: dict[str, Any]
         ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(row of each of ``rows`` (sample_id, payload digest) in the kept table at ``path`` or -1, its values, and
    whether the table holds exactly ``rows``, in order and with the same values in every column of ``rows``);
    all -1 when the table is missing, untrusted or was made under another identity.

    A table that holds exactly ``rows`` is what writing them again would give, byte for byte (the same rows,
    values and metadata through the same code: its identity says so): the stage leaves it as it is, so an
    unchanged test split costs a read per table, not a rewrite. ``source`` names what decided the rows (the test
    split's md5, and how its samples were routed); the table stores it beside its identity, and a table made from
    the same source holds exactly ``rows`` by construction (``rows`` are that split's, in its sample_id order, as
    the table's), so only its values are read: at a million samples, comparing and converting the kept tables'
    keys was a quarter of the stage."""
    stored = read_metadata(path) if trusted and path.is_file() else None
    if stored is None or {key: value for key, value in stored.items() if key != "source"} != identity:
        return np.full(len(rows), -1, dtype=np.int64), np.zeros((0, 0), np.float32), False
    if stored.get("source") == source:
        values = _values(path)
        if values is not None and len(values) == len(rows):
            return np.arange(len(rows), dtype=np.int64), values, True
    frame, values = read_embeddings(path, digests=True)
    found = reusable_rows(frame, rows["sample_id"].to_numpy(), rows[PAYLOAD_DIGEST].to_numpy())
    same = stored.get("source") == source and len(frame) == len(rows) and bool(
        (found == np.arange(len(rows))).all()) and all(
        c in frame.columns and np.array_equal(frame[c].to_numpy(dtype=object), rows[c].to_numpy(dtype=object))
        for c in rows.columns)
    return found, values, same


def _values(path: Path) -> np.ndarray | None:
    """The ``embedding`` column of a table ``write_embeddings`` wrote, without its other columns (None for any
    other layout: the caller then reads the whole table, which names what is wrong)."""
    column = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        return None
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def test_points(test: pd.DataFrame, projection: np.ndarray, width: int, classes: list[int], trusted: bool,
                identity: dict[str, Any], source: dict[str, Any]) -> np.ndarray:
    """Projected features of every test sample: kept ones reused, the others read and projected (``source``:
    the test split's md5, ``kept``)."""
    rows = test[["sample_id", "label", PAYLOAD_DIGEST]]  # with labels: the baseline probe is scored on these points
    found, previous, same = kept(TEST_POINTS, trusted, identity, rows, source)
    if same:
        return previous
    points = np.zeros((len(test), width), dtype=np.float32)
    if (found >= 0).any():
        points[found >= 0] = previous[found[found >= 0]]
    todo = np.flatnonzero(found < 0)
    if len(todo):
        frame, embeddings = read_embeddings(ENCODED_TEST)
        check_encoded(frame, embeddings, ENCODED_TEST, classes, projection.shape[1])
        points[todo] = project(embeddings[todo], projection)
    write_embeddings(TEST_POINTS, rows, points, keep_identical=True, metadata={**identity, "source": source})
    return points


def test_routing(rows: pd.DataFrame, points: np.ndarray, keys: np.ndarray, k: int, usable: np.ndarray,
                 trusted: bool, identity: dict[str, Any], source: dict[str, Any]) -> tuple[np.ndarray, int]:
    """The adapters each test sample activates (N, k'), nearest first, and how many samples were routed: kept rows
    reused, the others routed.

    Routing is per sample (its point, the keys, k and the usable adapters, which ``identity`` holds), so a kept
    row's adapters are what routing it again gives. Why kept: routing every test point again on each rerun cost
    more than the rest of a forget's evaluation (0.4-0.6 s at 56k test samples)."""
    width = min(k, int(usable.sum()))
    found, previous = np.full(len(rows), -1, dtype=np.int64), np.zeros((0, width), dtype=np.int32)
    stored = read_metadata(TEST_ROUTING) if trusted and TEST_ROUTING.is_file() else None
    if stored is not None and {key: value for key, value in stored.items() if key != "source"} == identity:
        same = stored.get("source") == source  # made from this very split: its rows, in order (``kept``)
        table = pq.read_table(TEST_ROUTING, columns=["adapters"] if same else None)
        previous = table.column("adapters").combine_chunks().flatten().to_numpy().reshape(-1, width)
        if same and len(table) == len(rows):
            return previous.astype(np.int64), 0  # exactly these rows: nothing to route, nothing to write
        if not same:
            found = reusable_rows(table.select(["sample_id", PAYLOAD_DIGEST]).to_pandas(),
                                  rows["sample_id"].to_numpy(), rows[PAYLOAD_DIGEST].to_numpy())
    activated = np.zeros((len(rows), width), dtype=np.int64)
    if (found >= 0).any():
        activated[found >= 0] = previous[found[found >= 0]]
    todo = np.flatnonzero(found < 0)
    activated[todo] = route(points[todo], keys, k, usable)
    write_table(rows.assign(adapters=[row.astype(np.int32) for row in activated]), TEST_ROUTING,
                metadata={**identity, "source": source})
    return activated, len(todo)


def main() -> None:
    params = load_params()
    code = check_code(params, "evaluate")
    classes, k = list(params["data"]["classes"]), int(params["adapters"]["k"])
    test = ENCODED_TEST
    outputs = [METRICS / "evaluate.json", METRICS / "per_class.csv", ADAPTER_LOAD]
    with stage_run("evaluate", Path(), {"adapters.k": k, "data.classes": classes, "code": code},
                   [test, PROJECTION, KEYS, ADAPTERS], [*outputs[:2], EVALUATION]) as run:  # the load is in it
        projection, keys = np.load(PROJECTION), np.load(KEYS)
        frame = read_table(test, ["sample_id", "label", PAYLOAD_DIGEST])
        trusted = EVALUATION.is_dir() and recorded_md5(EVALUATION) == dvc_digest(EVALUATION, Path())
        projection_md5, split = file_md5(PROJECTION), {"test_md5": file_md5(test)}  # split: what decides the rows
        points = test_points(frame, projection, keys.shape[1], classes, trusted,
                             {"projection_md5": projection_md5, "code": code}, split)
        infos = {adapter_index(p): json.loads(p.read_text()) for p in sorted(ADAPTERS.rglob("adapter-*.json"))}
        missing = sorted(set(range(len(keys))) - set(infos))
        if missing:
            raise FileNotFoundError(f"{ADAPTERS}: no summary for adapter(s) {missing[:5]}; run `dvc repro`")
        usable = np.array([infos[j]["train_samples"] > 0 for j in range(len(keys))])
        routing = {"projection_md5": projection_md5, "keys_md5": file_md5(KEYS), "k": k, "usable": usable.tolist(),
                   "code": code}
        activated, routed = test_routing(frame[["sample_id", PAYLOAD_DIGEST]], points, keys, k, usable, trusted,
                                         routing, split)
        activation = {**split, "routing": routing}  # what decides which test samples activate an adapter
        scored, written = {}, set()

        def outputs_of(j: int, rows: np.ndarray) -> np.ndarray:
            """Adapter j's outputs for ``rows``: kept ones where its weights and the rows are unchanged."""
            path = EVALUATION / f"{adapter_name(j)}.parquet"
            identity = {"weights_md5": infos[j]["weights_md5"], "projection_md5": projection_md5, "code": code}
            keys_of = frame.iloc[rows][["sample_id", PAYLOAD_DIGEST]]
            found, previous, same = kept(path, trusted, identity, keys_of, activation)
            written.add(path)
            if same:
                scored[j] = 0
                return previous
            proba = np.zeros((len(rows), len(classes)), dtype=np.float32)
            if (found >= 0).any():
                proba[found >= 0] = previous[found[found >= 0]]
            todo = np.flatnonzero(found < 0)
            if len(todo):
                weights = load_file(next(ADAPTERS.rglob(f"{adapter_name(j)}.safetensors")))
                proba[todo] = adapter_proba(weights, points[rows[todo]])
            scored[j] = len(todo)
            write_embeddings(path, keys_of, proba, keep_identical=True, metadata={**identity, "source": activation})
            return proba

        proba = mean_proba(activated, len(classes), outputs_of)
        for stray in sorted(set(EVALUATION.iterdir()) - written - {TEST_POINTS, TEST_ROUTING, ADAPTER_LOAD}):
            stray.unlink()  # outputs of adapters no test sample activates now, stale temp files
        predicted = np.asarray(classes)[proba.argmax(axis=1)]
        truth = frame["label"].to_numpy()
        accuracy = float((predicted == truth).mean()) if len(truth) else float("nan")
        recall = [float((predicted[truth == c] == c).mean()) if (truth == c).any() else float("nan")
                  for c in classes]
        load = pd.DataFrame({
            "adapter": [infos[j]["adapter"] for j in sorted(infos)],
            "train_samples": [infos[j]["train_samples"] for j in sorted(infos)],
            "test_activations": [int((activated == infos[j]["adapter"]).sum()) for j in sorted(infos)],
        })
        validate(load, adapter_load_schema(len(keys)), outputs[2])  # before any output is written
        METRICS.mkdir(exist_ok=True)
        pd.DataFrame({"label": classes, "recall": recall}).to_csv(outputs[1], index=False)
        load.to_csv(outputs[2], index=False)
        metrics = {"accuracy": round(accuracy, 6), "test_samples": len(truth)}
        write_json(outputs[0], metrics)
        run.update({**metrics, "empty_adapters": int((load["train_samples"] == 0).sum()),  # MLflow only, not git
                    "max_adapter_load": int(load["train_samples"].max()),
                    "train_samples_routed": int(load["train_samples"].sum())})
        run["test_outputs_scored"] = sum(scored.values())
        run["test_samples_routed"] = routed
        print(f"evaluate: routed {routed} of {len(frame)} test samples, scored {sum(scored.values())} adapter outputs")


if __name__ == "__main__":
    run_stage(main)
