"""DVC stage `assign`: route every train sample to its k nearest keys; write one shard per adapter and the index.

DVC clears and rewrites the shard directory on every run, but equal content gives equal bytes (same md5), so DVC
keeps `train@j` cached for every adapter whose samples did not change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.dataset import read_embeddings, write_embeddings, write_table
from pipeline.keys import project
from pipeline.layout import ENCODED_TRAIN, KEYS, PROJECTION, ROUTING, SHARDS, encoded_path, shard_path
from pipeline.lineage import stage_run
from pipeline.routing import route, routing_index, shard
from stages.project import check_generated, load_params


def main() -> None:
    params = load_params()
    check_generated(params)
    n, k, blocks = int(params["adapters"]["n"]), int(params["adapters"]["k"]), int(params["adapters"]["blocks"])
    partitions = int(params["data"]["partitions"])
    used = {"adapters.n": n, "adapters.k": k, "adapters.blocks": blocks, "data.partitions": partitions}
    with stage_run("assign", Path(), used, [ENCODED_TRAIN, PROJECTION, KEYS],
                   [SHARDS, ROUTING]) as run:
        projection, keys = np.load(PROJECTION), np.load(KEYS)
        frames, points = [], []
        for index in range(partitions):
            frame, embeddings = read_embeddings(encoded_path(index))
            frames.append(frame.assign(partition=np.int32(index)))
            points.append(project(embeddings, projection))
        frame = pd.concat(frames, ignore_index=True)
        features = np.concatenate(points) if points else np.zeros((0, keys.shape[1]), np.float32)
        assignment = route(features, keys, k)
        for j, rows in enumerate(shard(frame.assign(row=np.arange(len(frame))), assignment, n)):
            write_embeddings(shard_path(j, n, blocks), rows[["sample_id", "label"]], features[rows["row"].to_numpy()])
        write_table(routing_index(frame["sample_id"].to_numpy(), frame["partition"].to_numpy(), assignment),
                    ROUTING)
        run["train_samples"] = len(frame)
        run["empty_adapters"] = int(n - len(np.unique(assignment)))


if __name__ == "__main__":
    main()
