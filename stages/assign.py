"""DVC stage `assign`: route every train sample to its k nearest keys; write one shard per adapter and the index.

The shard directory is a `persist` output: DVC leaves it in place, and this stage rewrites only the shards whose
bytes change (a forget touches k of n) and deletes shards of adapters that no longer exist. The others keep their
bytes and their mtime, so DVC does not hash them again, and every `train@block` whose shards did not change
stays cached. Equal content always gives equal bytes, so the result is the same as writing every shard anew.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.contracts import check_encoded, check_shards, routing_schema, validate
from pipeline.dataset import read_embeddings, write_embeddings, write_table
from pipeline.keys import project
from pipeline.layout import ENCODED_TRAIN, KEYS, PROJECTION, ROUTING, SHARDS, encoded_path, shard_path
from pipeline.lineage import stage_run
from pipeline.routing import route, routing_index, shard
from stages.project import check_generated, load_params, run_stage


def main() -> None:
    params = load_params()
    check_generated(params)
    n, k, blocks = int(params["adapters"]["n"]), int(params["adapters"]["k"]), int(params["adapters"]["blocks"])
    partitions, classes = int(params["data"]["partitions"]), list(params["data"]["classes"])
    used = {"adapters.n": n, "adapters.k": k, "adapters.blocks": blocks, "data.partitions": partitions,
            "data.classes": classes}
    with stage_run("assign", Path(), used, [ENCODED_TRAIN, PROJECTION, KEYS],
                   [SHARDS, ROUTING]) as run:
        projection, keys = np.load(PROJECTION), np.load(KEYS)
        frames, points = [], []
        for index in range(partitions):
            frame, embeddings = read_embeddings(encoded_path(index))
            check_encoded(frame, embeddings, encoded_path(index), classes, projection.shape[1])
            frames.append(frame.assign(partition=np.int32(index)))
            points.append(project(embeddings, projection))
        frame = pd.concat(frames, ignore_index=True)
        features = np.concatenate(points) if points else np.zeros((0, keys.shape[1]), np.float32)
        assignment = route(features, keys, k)
        shards = [(shard_path(j, n, blocks), rows[["sample_id", "label"]], features[rows["row"].to_numpy()])
                  for j, rows in enumerate(shard(frame.assign(row=np.arange(len(frame))), assignment, n))]
        index = routing_index(frame["sample_id"].to_numpy(), frame["partition"].to_numpy(), assignment)
        # every output checked before the first is written: a broken contract leaves nothing behind
        check_shards(shards, classes, keys.shape[1])
        validate(index, routing_schema(n, k, partitions), ROUTING)
        written = sum(write_embeddings(path, rows, shard_features, keep_identical=True)
                      for path, rows, shard_features in shards)
        expected = {path for path, _, _ in shards}
        for stray in sorted(p for p in SHARDS.rglob("*") if p.is_file() and p not in expected):
            stray.unlink()  # shards of adapters that left (adapters.n or adapters.blocks changed), stale temp files
        for folder in sorted((p for p in SHARDS.rglob("*") if p.is_dir()), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        write_table(index, ROUTING)
        run["shards_written"] = written
        run["train_samples"] = len(frame)
        run["empty_adapters"] = int(n - len(np.unique(assignment)))


if __name__ == "__main__":
    run_stage(main)
