"""The tables the `quality` stage hands to Great Expectations, and the gate's reading of its result.

Great Expectations validates three small tables derived from the shards and the routing index (built here, without
importing GX, so they can be tested and reused cheaply):

* ``samples``: one row per training sample: its label, in how many shards it is, whether the routing index holds
  it, and the norm of its (projected) embedding;
* ``classes``: one row per class of ``data.classes``: training samples and share;
* ``adapters``: one row per adapter: samples, classes present, the largest class's share.

No table holds a sample ID: the reports are DVC outputs whose old versions must never carry the ID of a sample
forgotten later (the residue guarantee), and a plain hash of a guessable ID would be no better. The per-shard
values the tables are built from (``PARTIALS``) do hold IDs: they are a `persist` output of the stage, sample
tables like the shards, so the forget's purge by provenance deletes every old version holding a forgotten sample
(pipeline.purge.history).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from pipeline.model.keys import fit_projection, project
from pipeline.project.layout import REFERENCE_NORMS

QUALITY_DIR = Path("reports/quality")
RESULT = QUALITY_DIR / "result.json"
TABLES = QUALITY_DIR / "tables"
DATA_DOCS = QUALITY_DIR / "data_docs"
PARTIALS = QUALITY_DIR / "partials"  # each shard's ``shard_values``, a `persist` output (they hold sample IDs)
SUITES = ("training_data", "training_classes", "adapters")
TABLE_OF_SUITE = {"training_data": "samples", "training_classes": "classes", "adapters": "adapters"}


@dataclass(frozen=True)
class QualityParams:
    min_samples: int  # every adapter trains on at least this many samples
    min_class_samples: int  # every class keeps at least this many training samples
    max_class_share: float  # no class is more than this share of one adapter's samples
    min_adapter_classes: int  # every adapter sees at least this many classes
    norm_margin: float  # the reference split's norm range widened by this fraction of its span, each side
    norm_mostly: float  # share of training samples whose norm must fall in that range

    @classmethod
    def of(cls, params: dict[str, Any]) -> QualityParams:
        q = params["quality"]
        return cls(int(q["min_samples"]), int(q["min_class_samples"]), float(q["max_class_share"]),
                   int(q["min_adapter_classes"]), float(q["norm_margin"]), float(q["norm_mostly"]))

    def for_reference(self, samples: int) -> QualityParams:
        """The norm rule a reference split of ``samples`` embeddings can support on clean data.

        A clean training sample is as likely as any reference sample to be the largest (or smallest) of them all,
        so it falls beyond the reference split's [min, max] with probability 2 / (samples + 1), whatever the
        distribution. ``norm_mostly`` is kept only where that tail, doubled for sampling noise, fits in the share
        it tolerates; a smaller split tolerates ``4 / (samples + 1)`` (a small reference split would otherwise fail
        clean data). A corrupted split (wrong scale, wrong encoder)
        moves most samples out of range and still fails.
        """
        mostly = min(self.norm_mostly, round(1 - 4 / (samples + 1), 4))
        return dataclasses.replace(self, norm_mostly=max(0.0, mostly))


def norm_bounds(features: np.ndarray) -> dict[str, Any]:
    """How many embeddings, and the [min, max] of their norms (float64): what the norm rule is learned from.

    The `keys` stage stores it for the reference split (``REFERENCE_NORMS``): it runs only when the reference
    split or the projection changes, so a forget never redoes the two PCA fits of ``held_out_features``.
    """
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    return {"samples": len(norms), "min": float(norms.min()) if len(norms) else None,
            "max": float(norms.max()) if len(norms) else None}


def norm_range(bounds: dict[str, Any], margin: float) -> tuple[float, float]:
    """The ``norm_bounds`` of the reference split widened by ``margin`` times their span on each side."""
    if not bounds["samples"]:
        return 0.0, float("inf")
    low, high = float(bounds["min"]), float(bounds["max"])
    span = high - low
    return round(max(0.0, low - margin * span), 6), round(high + margin * span, 6)


def read_norm_bounds(path: Path = REFERENCE_NORMS) -> dict[str, Any]:
    """The reference split's ``norm_bounds`` as the `keys` stage wrote them."""
    try:
        bounds = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `dvc repro` (or `legonet build`) to produce it") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc}); run `dvc repro -f keys` to write it again") from exc
    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)

    if not isinstance(bounds, dict) or set(bounds) != {"samples", "min", "max"}:
        raise DataError(f"{path}: expected the keys samples, min, max; run `dvc repro -f keys` to write it again")
    samples, low, high = bounds["samples"], bounds["min"], bounds["max"]
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0
            and (samples == 0 or (number(low) and number(high) and 0 <= low <= high))):
        raise DataError(f"{path}: samples must be a count and min <= max finite norms (found {bounds}); run "
                        "`dvc repro -f keys` to write it again")
    return bounds


def held_out_features(reference: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """The reference split's features as clean training samples show them: projected by a PCA that did not see them.

    A PCA fitted on the reference split keeps more of its own samples' variance than of new samples', so their
    projected norms run larger and a norm range learned from them rejects clean data. Each half of the split
    (alternate rows: the split is sorted by sample_id) is projected by a PCA fitted on the other half. A projection
    that is no PCA (none, or a table's standardisation, whose axes are not unit vectors) is applied as it is.
    """
    dim = projection.shape[0] - 1
    axes = projection[1:]
    if dim <= 0 or not np.allclose(np.linalg.norm(axes.astype(np.float64), axis=1), 1.0, atol=1e-3) \
            or len(reference) < 2 * (dim + 1):
        return project(reference, projection)
    halves = np.arange(len(reference)) % 2 == 0
    out = np.empty((len(reference), dim), dtype=np.float32)
    for held in (halves, ~halves):
        out[held] = project(reference[held], fit_projection(reference[~held], dim))
    return out


def shard_values(frame: pd.DataFrame, features: np.ndarray) -> pd.DataFrame:
    """What the checkpoint needs of one shard (a frame with sample_id and label, its features): each row's
    sample_id, label and embedding norm (float64). It depends on the shard's bytes alone, so the `quality` stage
    keeps it per shard (``PARTIALS``) and reads again only the shards a forget rewrote."""
    norms = np.linalg.norm(features.astype(np.float64), axis=1) if len(frame) else np.zeros(0)
    return pd.DataFrame({"sample_id": frame["sample_id"].astype(str).to_numpy(), "label": frame["label"].to_numpy(),
                         "norm": norms})


def samples_by_id(every: pd.DataFrame, routed_ids: Sequence[str]) -> pd.DataFrame:
    """The ``samples`` table (before its label type is settled) from all shards' rows (``every``) and the routing
    index's IDs, for any input: one row per ID found in a shard or the index, in sample_id order."""
    per_sample = every.groupby("sample_id", sort=True).agg(label=("label", "first"), shards=("label", "size"),
                                                          norm=("norm", "first"))
    # plain Python strings: pandas' Arrow-backed string index answers `isin` one value at a time (seconds at 1M)
    routed = pd.Index(np.unique(np.asarray(routed_ids, dtype=object).astype(str)).astype(object), name="sample_id")
    per_sample.index = per_sample.index.astype(object)
    per_sample = per_sample.reindex(per_sample.index.union(routed))
    per_sample["in_routing"] = per_sample.index.isin(routed)
    per_sample["shards"] = per_sample["shards"].fillna(0).astype(np.int64)
    return per_sample.reset_index(drop=True)  # no IDs leave this function


def samples_of_routing(every: pd.DataFrame, routed_ids: Sequence[str]) -> pd.DataFrame | None:
    """``samples_by_id`` in the case `assign` writes, without grouping by a string: the index's IDs strictly
    increasing, every shard row's ID among them, every one of them in a shard. Then the table's rows are the
    index's, in its order, and each shard row is matched to its sample by a hash look-up in Arrow (grouping
    millions of string IDs took seconds at a million samples, on every forget). None in any other case (a
    contract broken upstream), which ``samples_by_id`` handles: the same table either way."""
    routed = pa.array(np.asarray(routed_ids, dtype=object), type=pa.string())
    if not len(routed) or routed.null_count or not pc.all(pc.less(routed[:-1], routed[1:])).as_py():
        return None
    position = pc.index_in(pa.array(every["sample_id"].array, type=pa.string()), value_set=routed)
    if position.null_count:
        return None
    position = position.to_numpy(zero_copy_only=False)
    shards = np.bincount(position, minlength=len(routed)).astype(np.int64)
    if not shards.all():
        return None
    _, first = np.unique(position, return_index=True)  # a stable sort: the first row of each sample, as `first`
    return pd.DataFrame({"label": every["label"].iloc[first].reset_index(drop=True), "shards": shards,
                         "norm": every["norm"].to_numpy()[first],
                         "in_routing": np.ones(len(routed), dtype=bool)})


def tables(shards: Sequence[pd.DataFrame], routed_ids: Sequence[str], classes: Sequence[int]
           ) -> dict[str, pd.DataFrame]:
    """The three tables from each shard's ``shard_values`` (adapter order) and the sample IDs of the routing
    index."""
    rows = list(shards)
    adapters = []
    for j, frame in enumerate(rows):
        counts = frame["label"].value_counts()
        adapters.append({"adapter": j, "samples": len(frame), "classes_present": int((counts > 0).sum()),
                         "max_class_share": round(float(counts.max() / len(frame)), 6) if len(frame) else 0.0})
    every = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        {"sample_id": pd.Series(dtype=str), "label": pd.Series(dtype="int64"), "norm": pd.Series(dtype=float)})
    found = samples_of_routing(every, routed_ids)
    samples = samples_by_id(every, routed_ids) if found is None else found
    if pd.api.types.is_numeric_dtype(samples["label"]):  # integer classes: reindexing made them floats
        samples["label"] = samples["label"].astype("Int64")
    counts = samples["label"].value_counts()
    total = max(1, len(samples))
    class_table = pd.DataFrame({"label": list(classes),
                                "samples": [int(counts.get(c, 0)) for c in classes]})
    class_table["share"] = (class_table["samples"] / total).round(6)
    return {"samples": samples[["label", "shards", "in_routing", "norm"]],
            "classes": class_table, "adapters": pd.DataFrame(adapters)}


def failures(result: dict[str, Any], row_names: dict[str, tuple[str, list[Any]]] | None = None) -> list[str]:
    """One line per failed expectation of a checkpoint result (``CheckpointResult.describe_dict()`` with the
    suite names added): suite, expectation, its arguments and what was found. ``row_names`` maps a suite to
    (what a row is, the name of each row), e.g. ``{"adapters": ("adapter", [0, 1, ...])}``."""
    row_names = row_names or {}
    lines = []
    for validation in result.get("validation_results", []):
        suite = validation.get("suite", "?")
        for item in validation.get("expectations", []):
            if item.get("success"):
                continue
            kwargs = {k: v for k, v in item.get("kwargs", {}).items() if k != "batch_id"}
            args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            found = item.get("result", {})
            if found.get("partial_unexpected_index_list"):
                rows = found["partial_unexpected_index_list"][:10]
                if suite in row_names:
                    kind, names = row_names[suite]
                    what = f"failing {kind} {[names[i] for i in rows]}"
                else:
                    what = f"{found.get('unexpected_count', len(rows))} failing row(s)"
                if found.get("partial_unexpected_list"):
                    what += f" (values {found['partial_unexpected_list'][:10]})"
            elif found.get("partial_missing_list"):
                what = f"missing {found['partial_missing_list'][:10]}"
            else:
                what = f"observed {found.get('observed_value')}"
            lines.append(f"{suite}: {item.get('expectation_type')}({args}): {what}")
    return lines


def read_result(path: Path = RESULT) -> dict[str, Any]:
    """The quality stage's result: ``{"success": bool, "failed": [...], ...}``; a missing file is a failure."""
    if not path.is_file():
        return {"success": False, "failed": [f"{path}: missing; the quality stage did not run"]}
    return json.loads(path.read_text())
