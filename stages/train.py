"""DVC stage `train@JJJJ`: train adapter j on its shard alone and write its weights (safetensors) and a summary."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")  # before anything imports torch: thread-independent matmuls

import numpy as np
from safetensors.numpy import save

from pipeline.adapters import TrainParams, adapter_seed, train_adapter
from pipeline.dataset import read_embeddings, write_bytes_atomic
from pipeline.lineage import stage_run
from stages.project import adapter_info_path, adapter_path, load_params, shard_path


def main(adapter: str) -> None:
    params = load_params()
    j = int(adapter)
    classes = list(params["data"]["classes"])
    train = params["adapters"]["train"]
    seed = adapter_seed(int(params["adapters"]["seed"]), j)
    used = {"adapters.seed": params["adapters"]["seed"], "adapters.train": train, "data.classes": classes}
    src, out, info = shard_path(j), adapter_path(j), adapter_info_path(j)
    with stage_run(f"train@{adapter}", Path(), used, [src], [out, info],
                   {"adapter": adapter, "adapter.seed": str(seed)}) as run:
        frame, features = read_embeddings(src)
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[c] for c in frame["label"]], dtype=np.int64)
        weights = train_adapter(features, labels, len(classes), seed, TrainParams(**train))
        # safetensors with no metadata is byte-stable (several metadata keys are written in random order)
        write_bytes_atomic(out, save(weights))
        summary = {"adapter": j, "train_samples": len(frame), "seed": seed,
                   "class_counts": {str(c): int((labels == i).sum()) for c, i in index.items()}}
        write_bytes_atomic(info, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
        run["train_samples"] = len(frame)


if __name__ == "__main__":
    main(sys.argv[1])
