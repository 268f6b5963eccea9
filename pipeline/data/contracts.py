"""Data contracts: a pandera schema for every table that crosses a stage boundary.

Stages validate what they read and what they write (``lazy=True``: every rule is checked), and a failure becomes
one ``ContractError`` naming the file, the rule and the first failing sample IDs, so a bad table stops the
pipeline at the stage that would have consumed or produced it, before anything is written. Schemas are built
from params (classes, embedding width, n, k) because the rules depend on them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow
import pyarrow.compute as pc

from pipeline.data.ids import sample_ids_valid
from pipeline.errors import ContractError

# one rule with the manifest (pipeline/data/ids.py), applied with fullmatch: ``str_matches`` would accept a trailing
# newline that no manifest can name
_SAMPLE_ID_RULE = pa.Check(sample_ids_valid, name="sample_id_rule",
                           error="sample_id_rule (a letter or digit, then letters, digits and ._:@+=-; no spaces)")


def _sample_id() -> pa.Column:
    return pa.Column(str, _SAMPLE_ID_RULE, unique=True, nullable=False)


def _label(classes: Sequence[int | str]) -> pa.Column:
    """Integer class indices, or class names (strings) when ``data.classes`` names them."""
    named = any(isinstance(c, str) for c in classes)
    return pa.Column(str if named else "int64", pa.Check.isin(list(classes)), nullable=False)


def _embedding(dim: int | None) -> pa.Column:
    """One rule per property, so a message says which one broke (dtype, width or finite values).

    The checks see the whole column at once: a Python check per row would run k times per training sample (the
    shards hold k rows per sample) at every forget.
    """
    def verdicts(column: pd.Series, rule: Callable[[list[np.ndarray]], np.ndarray]) -> pd.Series:
        values = column.to_numpy()
        vector = np.fromiter((isinstance(v, np.ndarray) and v.ndim == 1 for v in values), dtype=bool,
                             count=len(values))
        ok = np.zeros(len(values), dtype=bool)
        if vector.any():
            ok[vector] = rule(list(values[vector]))
        return pd.Series(ok, index=column.index)

    def finite(rows: list[np.ndarray]) -> np.ndarray:
        numeric = np.array([row.dtype.kind in "fiub" for row in rows], dtype=bool)
        ok = np.zeros(len(rows), dtype=bool)
        if numeric.any():
            kept = [row for row, is_numeric in zip(rows, numeric, strict=True) if is_numeric]
            sizes = np.array([row.size for row in kept])
            bad = ~np.isfinite(np.concatenate(kept).astype(np.float64, copy=False))
            clean = np.ones(len(kept), dtype=bool)
            clean[np.repeat(np.arange(len(kept)), sizes)[bad]] = False
            ok[numeric] = clean
        return ok

    checks = [
        pa.Check(lambda c: verdicts(c, lambda rows: np.array([r.dtype == np.float32 for r in rows], dtype=bool)),
                 error="embedding is a float32 vector"),
        pa.Check(lambda c: verdicts(c, finite), error="embedding values are finite (no NaN or inf)"),
    ]
    if dim is not None:
        checks.append(pa.Check(lambda c: verdicts(c, lambda rows: np.array([r.shape[0] == dim for r in rows],
                                                                           dtype=bool)),
                               error=f"embedding width is {dim}"))
    return pa.Column(object, checks, nullable=False, metadata={"width": dim})


def _vectors_pass(embeddings: np.ndarray, schema: pa.DataFrameSchema) -> bool:
    """Whether every row of ``embeddings`` passes the schema's embedding rules, judged on the array at once: the rows
    of a 2-D float32 array of the schema's width with only finite values are float32 vectors of that width, finite.
    The rules run a Python step per row (k rows per training sample in the shards): at 280k samples that was
    seconds of every stage that reads shards. An array that fails goes through the rules row by row, whose message
    names the rows."""
    column = schema.columns.get("embedding")
    width = (column.metadata or {}).get("width") if column is not None else None
    return (column is not None and isinstance(embeddings, np.ndarray) and embeddings.ndim == 2
            and embeddings.dtype == np.float32 and (width is None or embeddings.shape[1] == width)
            and bool(np.isfinite(embeddings).all()))


def samples_schema(modality: str, classes: Sequence[int | str], image_bytes: int | None,
                   features: Sequence[str] = ()) -> pa.DataFrameSchema:
    """Raw partitions, reference and test splits: sample_id, label and the payload (a table: its feature columns,
    float64 and finite; a missing value is no sample the encoder can place)."""
    if modality == "image":
        payload = {"image": pa.Column(object, pa.Check(lambda b: isinstance(b, bytes) and len(b) == image_bytes,
                                                       element_wise=True, error=f"image is {image_bytes} uint8 pixels"),
                                      nullable=False)}
    elif modality == "table":
        payload = {name: pa.Column("float64", pa.Check(lambda v: bool(np.isfinite(v)), element_wise=True,
                                                       error="feature is a finite number"), nullable=False)
                   for name in features}
    else:
        payload = {"text": pa.Column(str, pa.Check(lambda t: bool(t.strip()), element_wise=True,
                                                   error="text is not empty"), nullable=False)}
    return pa.DataFrameSchema({"sample_id": _sample_id(), "label": _label(classes), **payload},
                              strict=True, name="samples")


def samples_contract(data: dict) -> pa.DataFrameSchema:
    """``samples_schema`` from the ``data`` section of params (modality, classes, image shape, features)."""
    image_bytes = int(np.prod(data["image_shape"])) if data["modality"] == "image" else None
    return samples_schema(data["modality"], data["classes"], image_bytes, data.get("features") or ())


def encoded_schema(classes: Sequence[int], dim: int | None, extra: dict[str, pa.Column] | None = None
                   ) -> pa.DataFrameSchema:
    """Encoded partitions and shards: sample_id, label, embedding (width ``dim``, finite, float32)."""
    columns = {"sample_id": _sample_id(), "label": _label(classes), "embedding": _embedding(dim), **(extra or {})}
    return pa.DataFrameSchema(columns, strict=True, name="encoded")


def routing_schema(n: int, k: int, partitions: int, classes: Sequence[int | str]) -> pa.DataFrameSchema:
    """The routing index: each train sample once, its partition, its k distinct adapters in range, and the label
    and payload digest it was routed with."""
    def adapters_ok(column: pd.Series) -> pd.Series:
        """Row-wise verdicts, computed on one (rows, k) array: the index has a row per train sample, and a
        Python check per row cost seconds at 70k samples on every forget."""
        values = column.to_numpy()
        shaped = np.fromiter((np.shape(v) == (k,) for v in values), dtype=bool, count=len(values))
        ok = np.zeros(len(values), dtype=bool)
        if shaped.any():
            table = np.sort(np.stack([np.asarray(v) for v in values[shaped]]), axis=1)
            ok[shaped] = (table[:, 0] >= 0) & (table[:, -1] < n) & (np.diff(table, axis=1) != 0).all(axis=1)
        return pd.Series(ok, index=column.index)

    return pa.DataFrameSchema({
        "sample_id": _sample_id(),
        "partition": pa.Column("int32", pa.Check.in_range(0, partitions - 1)),
        "adapters": pa.Column(object, pa.Check(adapters_ok, error=f"{k} distinct adapters in 0..{n - 1}")),
        # what the sample's row was routed from: `assign` routes again only rows whose label or payload changed
        "label": _label(classes),
        "payload_sha256": pa.Column(object),
    }, strict=True, name="routing")


def check_unique_ids(sample_ids: pyarrow.ChunkedArray, path: Path | str) -> None:
    """Each sample ID once in a table sorted by sample_id (the routing index): the one rule across rows, checked
    over the whole table when only its new rows went through the schema (in Arrow: no Python object per row)."""
    ids = sample_ids.combine_chunks()
    repeated = sorted(set(ids[1:].filter(pc.equal(ids[1:], ids[:-1])).to_pylist()))
    if repeated:
        raise ContractError(f"{path}: breaks the routing contract: {len(repeated)} sample ID(s) in more than one "
                            f"raw partition: {repeated[:5]}; a sample must be in one partition only (data/raw): "
                            "remove the duplicate rows, or re-carve the data with `legonet init --force --data FILE`")


def adapter_load_schema(n: int) -> pa.DataFrameSchema:
    """reports/evaluate/adapter_load.csv: one row per adapter with non-negative counts."""
    return pa.DataFrameSchema({
        "adapter": pa.Column("int64", pa.Check.in_range(0, n - 1), unique=True),
        "train_samples": pa.Column("int64", pa.Check.ge(0)),
        "test_activations": pa.Column("int64", pa.Check.ge(0)),
    }, strict=True, name="adapter_load")


def validate(frame: pd.DataFrame, schema: pa.DataFrameSchema, path: Path | str, embeddings: np.ndarray | None = None
             ) -> pd.DataFrame:
    """Check ``frame`` (plus its ``embeddings`` as a column, if given) against ``schema``; raise ContractError."""
    if embeddings is not None and len(frame) == len(embeddings) and _vectors_pass(embeddings, schema):
        schema, embeddings = schema.remove_columns(["embedding"]), None  # the other columns' rules still run
    if embeddings is None:
        checked = frame
    else:  # object dtype even when empty (an adapter may have no samples): one vector per row
        checked = frame.assign(embedding=pd.Series(list(embeddings), index=frame.index, dtype=object))
    if not len(checked):  # an empty column read back from Parquet may come as object dtype: no value can break it
        schema = copy.deepcopy(schema)
        schema.coerce = True
    try:
        schema.validate(checked, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise ContractError(_summary(exc.failure_cases, checked, path, schema.name)) from None
    return frame


def _summary(cases: pd.DataFrame, frame: pd.DataFrame, path: Path | str, name: str | None) -> str:
    """One line per broken rule: the column, the rule, and the first failing sample IDs (and how many more).

    A column-level rule (dtype, a missing column) fails for every row: the message says so and names the first rows.
    """
    ids = frame["sample_id"].astype(str).tolist() if "sample_id" in frame.columns else None
    lines = []
    for (column, check), group in cases.groupby(["column", "check"], sort=False, dropna=False):
        rows = sorted({int(i) for i in group["index"].dropna()})
        found = ", ".join(repr(str(c)) for c in group["failure_case"].drop_duplicates().head(5))
        if rows and ids is not None:
            where = f"for {_first([ids[i] for i in rows])}"
        elif rows:
            where = f"for rows {_first(rows)}"
        elif ids:
            where = f"(found {found}) for every sample: {_first(ids)}"
        else:
            where = f"(found {found})"
        lines.append(f"{column if isinstance(column, str) else name or 'table'}: rule {check} fails {where}")
    return f"{path}: breaks the {name or 'table'} contract: " + "; ".join(lines)


def _first(values: Sequence[object], limit: int = 5) -> str:
    unique = list(dict.fromkeys(values))
    shown = ", ".join(repr(str(v)) for v in unique[:limit])
    rest = len(unique) - limit
    return f"{len(unique)} sample(s) {shown}" + (f" (and {rest} more)" if rest > 0 else "")


def check_encoded(frame: pd.DataFrame, embeddings: np.ndarray, path: Path | str, classes: Sequence[int],
                  dim: int | None) -> pd.DataFrame:
    """Validate an encoded table or shard (as ``read_embeddings`` returns it) against ``encoded_schema``."""
    return validate(frame, encoded_schema(classes, dim), path, embeddings)


def check_shards(shards: Sequence[tuple[Path, pd.DataFrame, np.ndarray]], classes: Sequence[int], dim: int | None
                 ) -> None:
    """Validate many shards (path, rows, embeddings) against ``encoded_schema`` in one pandera call.

    A call has a fixed cost however small the table, so checking n shards one by one would grow every `assign`
    and `quality` run with n. Their union obeys the same rules, with sample_id unique within each shard (a sample
    sits in k shards). Empty shards are checked on their own (an empty column may read back as another dtype). When
    the union fails, the shards are checked one by one, so the message names the file that broke the contract.
    """
    filled = [(path, frame, embeddings) for path, frame, embeddings in shards if len(frame)]
    for path, frame, embeddings in shards:
        if not len(frame):
            check_encoded(frame, embeddings, path, classes, dim)
    if not filled:
        return
    union = pd.concat([frame.assign(shard=np.int64(i)) for i, (_, frame, _) in enumerate(filled)],
                      ignore_index=True)
    columns = {"sample_id": pa.Column(str, _SAMPLE_ID_RULE, nullable=False),
               "label": _label(classes), "embedding": _embedding(dim), "shard": pa.Column("int64")}
    schema = pa.DataFrameSchema(columns, strict=True, name="encoded", unique=["shard", "sample_id"])
    try:
        if all(_vectors_pass(embeddings, schema) for _, _, embeddings in filled):
            validate(union, schema.remove_columns(["embedding"]), f"{len(filled)} shards")
        else:
            vectors = pd.Series([row for _, _, embeddings in filled for row in embeddings], dtype=object)
            validate(union, schema, f"{len(filled)} shards", vectors.to_numpy())
    except ContractError as union_error:
        for path, frame, embeddings in filled:
            check_encoded(frame, embeddings, path, classes, dim)
        raise union_error
