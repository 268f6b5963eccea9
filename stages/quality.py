"""DVC stage `quality`: a Great Expectations checkpoint over the training data as a whole and per adapter.

Runs after `assign`. Three suites (``data.quality``): ``training_data`` (one row per training sample: row count,
label set, in at most k shards, embedding norm within the range learned on the reference split),
``training_classes`` (every class keeps ``quality.min_class_samples``) and ``adapters`` (one row per adapter: at
least ``quality.min_samples``, class balance, classes present). Writes ``reports/quality/result.json`` (the
checkpoint result without run times or random ids: the `package` stage gates promotion on it, and the forget
flow's audit record holds its sha256), the tables validated, and Data Docs (static HTML).

The stage itself succeeds when the checkpoint fails: the data is what it is (a forget must still finish); the
`package` stage keeps the new version `candidate` and says which expectation failed. Only this stage imports
Great Expectations (its import costs seconds). The GX context is ephemeral: nothing but the reports is written.
It reads only what dvc.yaml declares: whether a sample the audit log lists as forgotten is back in the data is the
forget flow's check (pipeline.forget.flow.plan_batch), where the audit key and the log are.

Incremental (docs/design.md section 4, cost rule): what the checkpoint needs of a shard (each row's ID, label and
embedding norm, ``pipeline.data.quality.shard_values``) depends on the shard's bytes alone, so it is kept per shard
in ``reports/quality/partials`` (a `persist` output), keyed by the shard's md5, the classes, the feature width and
the stage's code entry. A rerun reads and checks only the shards whose md5 changed (a forget: the k shards of its
sample) and takes the others' values from their partials; the tables, the checkpoint and ``result.json`` are
those a full run writes, byte for byte. The partials are built on only when the folder is exactly what
``dvc.lock`` records.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.contracts import check_shards, routing_schema, validate
from pipeline.data.dataset import read_embeddings, read_metadata, read_table, write_bytes_atomic, write_table
from pipeline.data.quality import (
    DATA_DOCS,
    PARTIALS,
    RESULT,
    SUITES,
    TABLE_OF_SUITE,
    TABLES,
    QualityParams,
    failures,
    norm_range,
    read_norm_bounds,
    shard_values,
    tables,
)
from pipeline.data.salt import SALT_KEY, salt_of
from pipeline.project.code import check_code
from pipeline.project.layout import PROJECTION, REFERENCE_NORMS, ROUTING, SHARDS, adapter_name, shard_path
from pipeline.project.params import load_params, recorded_md5, run_stage
from pipeline.tracking.lineage import dvc_digest, file_md5, stage_run


def suites(q: QualityParams, n: int, k: int, classes: list[int], norms: tuple[float, float],
           samples: int) -> dict[str, list[Any]]:
    preload()
    # lazy: Great Expectations imported only where needed (seconds), not by every command and stage
    import great_expectations.expectations as gxe

    low, high = norms
    return {
        "training_data": [
            gxe.ExpectTableRowCountToEqual(value=samples, meta={"rule": "one row per sample of the routing index"}),
            gxe.ExpectColumnValuesToBeInSet(column="in_routing", value_set=[True],
                                            meta={"rule": "every sample in a shard is in the routing index"}),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
            gxe.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=classes,
                                                     meta={"rule": "every class of data.classes has samples"}),
            gxe.ExpectColumnValuesToBeBetween(column="shards", min_value=1, max_value=k,
                                              meta={"rule": "no sample in more than adapters.k shards"}),
            gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=low, max_value=high, mostly=q.norm_mostly,
                                              meta={"rule": "embedding norm in the range of the reference split"}),
        ],
        "training_classes": [
            gxe.ExpectTableRowCountToEqual(value=len(classes)),
            gxe.ExpectColumnValuesToBeBetween(column="samples", min_value=q.min_class_samples,
                                              meta={"rule": "quality.min_class_samples per class"}),
        ],
        "adapters": [
            gxe.ExpectTableRowCountToEqual(value=n),
            gxe.ExpectColumnValuesToBeBetween(column="samples", min_value=q.min_samples,
                                              meta={"rule": "quality.min_samples per adapter (no empty adapter)"}),
            gxe.ExpectColumnValuesToBeBetween(column="max_class_share", max_value=q.max_class_share,
                                              meta={"rule": "class balance: quality.max_class_share"}),
            gxe.ExpectColumnValuesToBeBetween(column="classes_present", min_value=q.min_adapter_classes,
                                              meta={"rule": "quality.min_adapter_classes per adapter"}),
        ],
    }


def preload() -> None:
    """Import Great Expectations, quietly and with its analytics off (a forget's stage worker calls this early)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations.expectations  # noqa: F401


def checkpoint(table_dir: Path, docs_dir: Path, expectations: dict[str, list[Any]]) -> dict[str, Any]:
    """Run one checkpoint (a validation definition per suite, each on its table) and build Data Docs."""
    preload()
    # lazy: Great Expectations imported only where needed (seconds), not by every command and stage
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site("reports", {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = context.data_sources.add_pandas("legonet")
    definitions = []
    for suite_name in SUITES:
        table = TABLE_OF_SUITE[suite_name]
        batch = source.add_parquet_asset(table, path=(table_dir / f"{table}.parquet").resolve()) \
            .add_batch_definition_whole_dataframe(table)
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations[suite_name]))
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)))
    check = context.checkpoints.add(gx.Checkpoint(
        name="legonet_quality", validation_definitions=definitions, result_format={"result_format": "SUMMARY"}))
    from great_expectations.core.run_identifier import RunIdentifier  # lazy: GX, as above

    result = check.run(run_id=RunIdentifier(run_name="legonet-quality"))
    # one site build for the three results (GX's UpdateDataDocsAction rebuilds the whole site once per suite)
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    suite_pages = [ExpectationSuiteIdentifier(name=name) for name in SUITES]
    context.build_data_docs(site_names=["reports"], resource_identifiers=[*result.run_results, *suite_pages])
    described = result.describe_dict()
    for validation, suite_name in zip(described["validation_results"], SUITES, strict=True):
        validation["suite"] = suite_name  # describe_dict keeps the order of the validation definitions
    return described


def shard_partials(n: int, blocks: int, classes: list[int], width: int, code: dict[str, str], trusted: bool
                   ) -> tuple[list[pd.DataFrame], int]:
    """Each adapter's ``shard_values`` (adapter order) and how many shards were read: a kept partial when it was
    made from the same shard bytes under the same identity, else the shard is read, checked against its contract
    (every shard read, in one call, before any partial is written) and its partial written."""
    values: dict[int, pd.DataFrame] = {}
    fresh = []
    for j in range(n):
        path, partial = shard_path(j, n, blocks), partial_path(j)
        identity = {"shard_md5": file_md5(path), "classes": classes, "width": width, "code": code}
        if trusted and partial.is_file() and read_metadata(partial) == identity:
            values[j] = read_table(partial)
        else:
            fresh.append((j, identity, path, *read_embeddings(path)))
    check_shards([(path, frame, features) for _, _, path, frame, features in fresh], classes, width)
    for j, identity, _, frame, features in fresh:
        values[j] = shard_values(frame, features)
        write_table(values[j], partial_path(j), metadata=identity)
    for stray in sorted(set(PARTIALS.iterdir()) - {partial_path(j) for j in range(n)}):
        stray.unlink()  # adapters that no longer exist, stale temp files
    return [values[j] for j in range(n)], len(fresh)


def routed_ids(params: dict[str, Any], n: int, k: int, partitions: int, classes: list[int]) -> np.ndarray:
    """The sample IDs of the routing index, checked against its contract unless `assign` wrote it under these
    params and the code params.yaml names for it (the index's metadata says so): `assign` refuses to write an
    index that breaks the same contract, so checking it again here read and checked every training row twice on
    each forget. An index from anywhere else is read and checked in full."""
    stored = read_metadata(ROUTING) or {}
    made_by_assign = {"adapters.n": n, "adapters.k": k, "data.partitions": partitions, "data.classes": classes,
                      "code": (params.get("code") or {}).get("assign")}
    if made_by_assign["code"] is not None and all(stored.get(key) == value for key, value in made_by_assign.items()):
        return read_table(ROUTING, ["sample_id"])["sample_id"].to_numpy()
    return validate(read_table(ROUTING), routing_schema(n, k, partitions, classes), ROUTING)["sample_id"].to_numpy()


def partial_path(adapter: int) -> Path:
    return PARTIALS / f"{adapter_name(adapter)}.parquet"


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def main() -> None:
    params = load_params()
    code = check_code(params, "quality")
    q = QualityParams.of(params)
    n, k, blocks = int(params["adapters"]["n"]), int(params["adapters"]["k"]), int(params["adapters"]["blocks"])
    partitions, classes = int(params["data"]["partitions"]), list(params["data"]["classes"])
    used = {"quality": params["quality"], "adapters.n": n, "adapters.k": k, "data.classes": classes, "code": code}
    inputs = [SHARDS, ROUTING, REFERENCE_NORMS, PROJECTION]
    outputs = [RESULT, TABLES, DATA_DOCS]
    with stage_run("quality", Path(), used, inputs, [*outputs, PARTIALS]) as run:
        projection = np.load(PROJECTION)
        width = projection.shape[0] - 1 if projection.shape[0] else projection.shape[1]
        routed = routed_ids(params, n, k, partitions, classes)
        trusted = PARTIALS.is_dir() and recorded_md5(PARTIALS) == dvc_digest(PARTIALS, Path())
        PARTIALS.mkdir(parents=True, exist_ok=True)
        shards, read = shard_partials(n, blocks, classes, width, code, trusted)
        run["shards_read"] = read
        print(f"quality: read {read} of {n} shards (the others' values kept)")
        bounds = read_norm_bounds()
        norms = norm_range(bounds, q.norm_margin)
        q = q.for_reference(int(bounds["samples"]))  # what a reference split of this size can support
        found = tables(shards, routed, classes)

        _remove(outputs)
        try:
            for name, table in found.items():
                write_table(table, TABLES / f"{name}.parquet")
            described = checkpoint(TABLES, DATA_DOCS, suites(q, n, k, classes, norms, len(routed)))
        except BaseException:
            _remove(outputs)  # a stage that fails leaves no output behind
            raise
        failed = failures(described, {"adapters": ("adapters", list(range(n))),
                                      "training_classes": ("classes", classes)})
        payload = {"success": bool(described["success"]), "failed": failed,
                   "norm_range_from_reference": list(norms), "checkpoint": described}
        # salted (pipeline.data.salt): its digest is published and its statistics are recomputable from the data
        salt = salt_of(RESULT, [json.dumps(payload, sort_keys=True, default=str)])
        payload |= {SALT_KEY: salt} if salt is not None else {}
        write_bytes_atomic(RESULT, (json.dumps(payload, indent=1, sort_keys=True, default=str) + "\n").encode())
        run.update({"quality_passed": int(payload["success"]), "quality_failed_expectations": len(failed)})
        print(f"quality checkpoint {'passed' if payload['success'] else 'FAILED'}"
              + "".join(f"\n  {line}" for line in failed))


if __name__ == "__main__":
    run_stage(main)
