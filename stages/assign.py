"""DVC stage `assign`: route every train sample to its k nearest keys; write one shard per adapter and the index.

Incremental (docs/design.md section 4, cost rule): routing is per sample, so the stage routes only rows that are new to
the index (a new sample, or one whose partition, label or payload changed), drops rows that left the encoded
partitions, and rewrites only the shards of the adapters those rows activate; it reads only the encoded partitions
whose md5 differs from the one the index was made from, and neither the embeddings of
unchanged rows nor the other shards. The shard directory is a `persist` output: DVC leaves it in place, untouched
shards keep their bytes and their mtime, so DVC does not hash them again and every `train@block` whose shards did
not change stays cached. The previous index is built on only when its md5 is the one ``dvc.lock`` records and it was
made with the same keys, projection, params and code entry (its Parquet metadata); otherwise every sample is routed
and every shard written. Either way the files are those a full recomputation writes, byte for byte.

Contracts: the stage checks what it reads. An encoded partition with rows to route is read and checked against its
contract in full. One whose md5 changed but whose rows are all in the index (a forget only removes rows: at 280k
samples a 100-sample forget changes 46 of 48 partitions, 1.4 GB of embeddings) is checked on its rows' IDs and
labels and on its embedding column's Parquet type (float32 vectors of the encoder's width); its embeddings are not
read, because none is used: a kept row's embedding was checked when it was routed, under the same sample_id, label
and payload digest, and `encode` checks every embedding it writes. A partition whose column type is wrong is read
and checked in full, so the error names the rule and the samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.contracts import (
    check_encoded,
    check_shards,
    check_unique_ids,
    encoded_schema,
    routing_schema,
    validate,
)
from pipeline.data.dataset import (
    PAYLOAD_DIGEST,
    read_embeddings,
    read_metadata,
    read_table,
    row_count,
    write_embeddings,
    write_rows,
)
from pipeline.data.threads import each
from pipeline.errors import ContractError
from pipeline.model.keys import project
from pipeline.model.routing import route, routing_changes, routing_index, shard
from pipeline.project.code import check_code
from pipeline.project.layout import (
    ENCODED_TRAIN,
    KEYS,
    PROJECTION,
    ROUTING,
    SHARDS,
    block_adapters,
    block_count,
    encoded_path,
    partition_name,
    shard_dir,
    shard_path,
)
from pipeline.project.params import check_generated, load_params, recorded_md5, run_stage
from pipeline.tracking.lineage import file_md5, stage_run

ROW_COLUMNS = ["sample_id", "label", PAYLOAD_DIGEST]
EMPTY_BLOCK = "EMPTY"
EMPTY_NOTE = b"no adapter: this block starts at or after adapters.n\n"


def previous_index(identity: dict[str, Any]) -> tuple[pa.Table | None, dict[str, str]]:
    """The routing index of the last run (in Arrow: its rows are kept, filtered and written back without becoming
    Python objects) and the md5 of each encoded partition it was made from, when it can be built on (see the
    module docstring), else (None, {})."""
    stored = read_metadata(ROUTING) if ROUTING.is_file() else None
    if (stored is None or {key: stored.get(key) for key in identity} != identity
            or recorded_md5(ROUTING) != file_md5(ROUTING)):
        return None, {}
    try:
        return pq.read_table(ROUTING).replace_schema_metadata(None), dict(stored.get("encoded_md5", {}))
    except (OSError, pa.ArrowException):
        return None, {}  # unreadable: every sample is routed again


def partition_rows(indices: list[int]) -> pd.DataFrame:
    """The ``ROW_COLUMNS`` and partition of every row of the encoded partitions ``indices``."""
    frames = [read_table(encoded_path(index), ROW_COLUMNS).assign(partition=np.int32(index))
              for index in indices or [0]]  # none to read (a forced rerun of unchanged data): the columns' own types
    return pd.concat(frames, ignore_index=True) if indices else frames[0].iloc[:0]


def vectors_typed(path: Path, dim: int) -> bool:
    """Whether the Parquet schema of ``path`` stores ``embedding`` as float32 vectors of width ``dim`` (read from
    the footer, not the data)."""
    try:
        kind = pq.read_schema(path).field("embedding").type
    except (OSError, KeyError, pa.ArrowException):
        return False
    return pa.types.is_fixed_size_list(kind) and kind.list_size == dim and kind.value_type == pa.float32()


def check_rows(rows: pd.DataFrame, partitions: list[int], classes: list[int], dim: int) -> None:
    """Check the rows (sample_id, label, partition) of the encoded ``partitions`` against their contract, the
    embeddings left out, in one pandera call: a call has a fixed cost, and a 100-sample forget changes 46 of 48
    partitions. Each ID is in one of them at most (a row whose ID the index holds in another partition is routed
    again, so it is not among these rows). When the call fails, the partitions are checked one by one, so the
    message names the file."""
    schema = encoded_schema(classes, dim).remove_columns(["embedding"])
    try:
        validate(rows[["sample_id", "label"]], schema, f"{len(partitions)} encoded partitions")
    except ContractError:
        for index in partitions:
            validate(rows.loc[rows["partition"] == index, ["sample_id", "label"]], schema, encoded_path(index))
        raise


def new_rows(rows: pd.DataFrame, current: pd.DataFrame, checked: set[int], projection: np.ndarray, width: int,
             classes: list[int]) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows to route (sample_id, label, payload digest, partition) and their projected features, read from
    their encoded partitions only. ``current``: the rows of every partition in ``checked`` (those that changed since
    the last run); one of them with no row to route is checked as the module docstring says, without reading its
    embeddings."""
    frames, points = [], [np.zeros((0, width), np.float32)]
    routed = set(rows["partition"].tolist())
    unread = sorted(index for index in checked - routed if vectors_typed(encoded_path(index), projection.shape[1]))
    if unread:
        check_rows(current[current["partition"].isin(unread)], unread, classes, projection.shape[1])
    for index in sorted((routed | checked) - set(unread)):
        path = encoded_path(index)
        frame, embeddings = read_embeddings(path, digests=True)
        check_encoded(frame[["sample_id", "label"]], embeddings, path, classes, projection.shape[1])
        wanted = frame["sample_id"].isin(set(rows["sample_id"][rows["partition"] == index])).to_numpy()
        frames.append(frame[wanted].assign(partition=np.int32(index)))
        points.append(project(embeddings[wanted], projection))
    return pd.concat(frames, ignore_index=True) if frames else rows.iloc[:0], np.concatenate(points)


def mark_empty_blocks(n: int, blocks: int) -> set[Path]:
    """Give each block without adapters (adapters.n below adapters.blocks) a marker file; return their paths.

    Its train stage depends on the block's shard folder, and DVC records files, not empty folders: a checkout of
    ``data/shards`` (a queued `dvc exp run` starts from one) would not recreate an empty one.
    """
    markers = {shard_dir(b) / EMPTY_BLOCK for b in range(block_count(blocks)) if not block_adapters(b, n, blocks)}
    for marker in markers:
        if not marker.is_file() or marker.read_bytes() != EMPTY_NOTE:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_bytes(EMPTY_NOTE)
    return markers


def main() -> None:
    params = load_params()
    check_generated(params)
    code = check_code(params, "assign")
    n, k, blocks = int(params["adapters"]["n"]), int(params["adapters"]["k"]), int(params["adapters"]["blocks"])
    partitions, classes = int(params["data"]["partitions"]), list(params["data"]["classes"])
    used = {"adapters.n": n, "adapters.k": k, "adapters.blocks": blocks, "data.partitions": partitions,
            "data.classes": classes}
    with stage_run("assign", Path(), {**used, "code": code}, [ENCODED_TRAIN, PROJECTION, KEYS],
                   [SHARDS, ROUTING]) as run:
        projection, keys = np.load(PROJECTION), np.load(KEYS)
        identity = {"projection_md5": file_md5(PROJECTION), "keys_md5": file_md5(KEYS), "code": code, **used}
        encoded_md5 = {partition_name(index): file_md5(encoded_path(index)) for index in range(partitions)}
        previous, seen = previous_index(identity)
        checked = {index for index in range(partitions)
                   if seen.get(partition_name(index)) != encoded_md5[partition_name(index)]}
        # a partition with the md5 the index was made from holds exactly the index's rows of it: only the others
        # are read and compared (a forget: the partitions of its samples)
        current = partition_rows(sorted(checked))
        if previous is None:
            kept, left, fresh = previous, previous, np.ones(len(current), dtype=bool)
        else:
            moving = np.isin(previous.column("partition").to_numpy(), sorted(checked))
            still = ~moving
            still[moving], fresh = routing_changes(previous.filter(pa.array(moving)).to_pandas(), current)
            kept, left = previous.filter(pa.array(still)), previous.filter(pa.array(~still))
        rows, features = new_rows(current[fresh], current, checked, projection, keys.shape[1], classes)
        assignment = route(features, keys, k)
        gone = set() if left is None else set(left.column("sample_id").to_pylist())
        touched = range(n) if left is None else sorted(
            set(pc.list_flatten(left.column("adapters")).to_pylist()) | {int(j) for j in assignment.ravel()})
        added = shard(rows.assign(row=np.arange(len(rows))), assignment, n)

        def updated(j: int) -> tuple[Path, pd.DataFrame, np.ndarray]:
            """Shard j: its previous rows less those that left, plus its new rows."""
            path = shard_path(j, n, blocks)
            base, base_features = (read_embeddings(path) if previous is not None and path.is_file()
                                   else (rows.iloc[:0][["sample_id", "label"]], features[:0]))
            stays = ~base["sample_id"].isin(gone).to_numpy()
            return (path, pd.concat([base[stays][["sample_id", "label"]], added[j][["sample_id", "label"]]],
                                    ignore_index=True),
                    np.concatenate([base_features[stays], features[added[j]["row"].to_numpy()]]))

        shards = each(updated, touched)
        new_index = routing_index(rows, assignment)
        # every output checked before the first is written: a broken contract leaves nothing behind. The kept rows
        # are the previous index's, which passed this very contract (same params and code: its identity), so only
        # the new rows are checked row by row, and the rule across rows (each ID once) over the whole index
        validate(new_index, routing_schema(n, k, partitions, classes), ROUTING)
        index = pa.Table.from_pandas(new_index, preserve_index=False)
        if kept is not None:  # a full index went through the contract whole, its uniqueness check included
            if len(index):  # (with no row routed, the new rows' columns have no type to cast from)
                index = pa.concat_tables([kept, index.cast(kept.schema)])
                index = index.take(pc.sort_indices(index, [("sample_id", "ascending")]))
            else:
                index = kept  # in sample_id order: the previous index's rows less those that left
            check_unique_ids(index.column("sample_id"), ROUTING)
        check_shards(shards, classes, keys.shape[1])  # after the index: an ID in two partitions is named as such
        written = sum(each(lambda item: write_embeddings(*item, keep_identical=True), shards))
        expected = {shard_path(j, n, blocks) for j in range(n)} | mark_empty_blocks(n, blocks)
        for stray in sorted(p for p in SHARDS.rglob("*") if p.is_file() and p not in expected):
            stray.unlink()  # shards of adapters that left (adapters.n or adapters.blocks changed), stale temp files
        for folder in sorted((p for p in SHARDS.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        write_rows(index, ROUTING, metadata={**identity, "encoded_md5": encoded_md5})
        run["shards_written"] = written
        run["routed_samples"] = len(rows)
        run["train_samples"] = len(index)
        sizes = {path: len(frame) for path, frame, _ in shards}  # the shards written; the others from their footers
        paths = [shard_path(j, n, blocks) for j in range(n)]
        run["empty_adapters"] = sum((sizes[p] if p in sizes else row_count(p)) == 0 for p in paths)


if __name__ == "__main__":
    run_stage(main)
