"""DVC stage `train@BBBB`: train the stale adapters of block b, each on its shard alone (safetensors + summary).

A block stage reruns when any shard of its block changed, but it retrains only the adapters whose inputs
changed: each adapter's summary records the md5 of the shard, the digest of the training params and the digest of
the stage's code entry (legonet's source and the library versions, ``pipeline.project.code``) it was trained
with, and an adapter is kept only when all three match and its weights still have the recorded digest. Training
is a pure function of (shard, params, seed_j) under that code, so a kept adapter is exactly what retraining would
give.
The block's outputs persist between runs (``persist: true`` in dvc.yaml) for that reason.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.contracts import check_shards
from pipeline.data.dataset import read_embeddings, write_bytes_atomic
from pipeline.data.salt import salt_of
from pipeline.model.adapters import adapter_seed
from pipeline.project.code import check_code
from pipeline.project.layout import adapter_dir, adapter_info_path, adapter_path, block_adapters, shard_dir, shard_path
from pipeline.project.params import load_params, run_stage
from pipeline.runner.executor import executor_of, run_train
from pipeline.tracking.lineage import file_md5, stage_run


def train_digest(used: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()


def is_current(info_file: Path, weights_file: Path, shard_md5: str, params_sha256: str, code_sha256: str) -> bool:
    """True when the adapter on disk was trained from exactly this shard and these params by this code, and is
    intact."""
    if not info_file.is_file() or not weights_file.is_file():
        return False
    info = json.loads(info_file.read_text())
    return (info.get("shard_md5") == shard_md5 and info.get("train_params_sha256") == params_sha256
            and info.get("code_sha256") == code_sha256 and info.get("weights_md5") == file_md5(weights_file))


def main(block_id: str) -> None:
    params = load_params()
    code = check_code(params, "train")
    code_sha256 = train_digest(code)
    block = int(block_id)
    n, blocks = int(params["adapters"]["n"]), int(params["adapters"]["blocks"])
    classes = list(params["data"]["classes"])
    train = params["adapters"]["train"]
    used = {"adapters.seed": params["adapters"]["seed"], "adapters.train": train, "data.classes": classes}
    params_sha256 = train_digest(used)
    members = block_adapters(block, n, blocks)
    out_dir = adapter_dir(block)
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = {p.name for j in members for p in (adapter_path(j, n, blocks), adapter_info_path(j, n, blocks))}
    for stray in out_dir.iterdir():  # adapters that left this block (n or blocks changed)
        if stray.name not in expected:
            stray.unlink()
    with stage_run(f"train@{block_id}", Path(), {**used, "adapters.n": n, "adapters.blocks": blocks, "code": code},
                   [shard_dir(block)], [out_dir], {"block": block_id, "legonet.executor": executor_of(params)}
                   ) as run:
        index = {c: i for i, c in enumerate(classes)}
        read = []
        for j in members:
            src, out, info = shard_path(j, n, blocks), adapter_path(j, n, blocks), adapter_info_path(j, n, blocks)
            shard_md5 = file_md5(src)
            if not is_current(info, out, shard_md5, params_sha256, code_sha256):
                read.append((j, src, shard_md5, *read_embeddings(src)))
        # every stale shard is checked against its contract before any adapter is written
        check_shards([(src, frame, features) for _, src, _, frame, features in read], classes, None)
        stale, jobs = [], []
        for j, src, shard_md5, frame, features in read:
            labels = np.array([index[c] for c in frame["label"]], dtype=np.int64)
            seed = adapter_seed(int(params["adapters"]["seed"]), j)
            stale.append((j, src, shard_md5, labels))
            salt = salt_of(adapter_path(j, n, blocks), sorted(frame["sample_id"]))
            jobs.append((j, features, labels, len(classes), seed, dict(train), salt))
        # the same pure function in this process or as Ray tasks: the same bytes either way
        results = run_train(params, jobs, int(train["threads"]))
        for (j, src, shard_md5, labels), job, (blob, lineage) in zip(stale, jobs, results, strict=True):
            out, info = adapter_path(j, n, blocks), adapter_info_path(j, n, blocks)
            write_bytes_atomic(out, blob)
            summary = {"adapter": j, "train_samples": len(labels), "seed": job[4], "shard_md5": shard_md5,
                       "train_params_sha256": params_sha256, "code_sha256": code_sha256,
                       "weights_md5": file_md5(out),
                       "class_counts": {str(c): int((labels == i).sum()) for c, i in index.items()}}
            write_bytes_atomic(info, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
            if executor_of(params) == "ray":
                lineage["inputs"] = {src.as_posix(): shard_md5}
                lineage["tags"][f"out.{out.as_posix()}"] = summary["weights_md5"]
                run.children.append(lineage)
        retrained = [j for j, *_ in stale]
        run["retrained_adapters"] = len(retrained)
        print(f"block {block_id}: retrained adapters {retrained} of {list(members)}")


if __name__ == "__main__":
    run_stage(main, sys.argv[1])
