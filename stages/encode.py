"""DVC stage `encode@NAME`: validate one sample table and write its embeddings (sample_id, label, embedding).

Incremental (docs/design.md section 4, cost rule): the output is a `persist` output, and an embedding depends on its
payload alone (the encoder is batch-invariant), so the stage keeps every row its previous output already holds
for the same sample_id and payload digest under the same encoding (encoder digest, thread count, modality, image
shape, features, and the code that computes an embedding from a payload with the libraries it calls:
``code.embedding``, ``pipeline.project.code.embedding_code``; not the stage's whole code entry, so a change to how
the table is written or checked reruns the stage without encoding again), drops
rows that left the input and encodes only the rest. A forget therefore calls the encoder zero
times. Each row carries its payload's sha256 and the file its encoding in Parquet metadata, so the table built
incrementally is byte-identical to a from-scratch one. The previous output is used only when its md5 is the one
``dvc.lock`` records for it; otherwise, or when the encoding changed, every row is encoded again.

Contracts: the sample table is checked against ``samples_schema`` when read and the embeddings against
``encoded_schema`` (the encoder's width, finite float32) before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from pipeline.data.contracts import check_encoded, samples_contract, validate
from pipeline.data.dataset import (
    PAYLOAD_DIGEST,
    encoder_inputs,
    payload_digests,
    read_embeddings,
    read_metadata,
    read_table,
    reusable_rows,
    write_embeddings,
)
from pipeline.project.code import check_code, check_embedding_code
from pipeline.project.layout import ENCODER, ENCODER_INFO
from pipeline.project.params import load_params, recorded_md5, run_stage
from pipeline.runner.executor import executor_of, run_encode
from pipeline.tracking.lineage import file_md5, stage_run


def previous_rows(dst: Path, encoding: dict[str, Any], sample_ids: list[str], digests: list[bytes]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(row of each wanted sample in the previous output or -1, the previous embeddings); all -1 when the
    previous output is missing, not the one dvc.lock records, or made under another encoding."""
    none = np.full(len(sample_ids), -1, dtype=np.int64), np.zeros((0, 0), np.float32)
    if not dst.is_file() or read_metadata(dst) != encoding or recorded_md5(dst) != file_md5(dst):
        return none
    frame, embeddings = read_embeddings(dst, digests=True)
    if PAYLOAD_DIGEST not in frame.columns:
        return none
    return reusable_rows(frame, sample_ids, digests), embeddings


def main(name: str, src_path: str | Path, dst_path: str | Path) -> None:
    src, dst = Path(src_path), Path(dst_path)
    params = load_params()
    code = check_code(params, "encode")
    data, threads = params["data"], int(params["encoder"]["threads"])
    info = json.loads(ENCODER_INFO.read_text())
    samples = validate(read_table(src), samples_contract(data), src)
    used = {"data": data, "encoder.threads": threads, "code": code}
    tags = {"encoder.sha256": info.get("weights_sha256", ""), "encoder.name": info["name"]}
    tags["legonet.executor"] = executor_of(params)
    encoding = {"encoder_sha256": info["sha256"], "threads": threads, "modality": data["modality"],
                "image_shape": list(data["image_shape"]) if data["modality"] == "image" else None,
                "features": list(data.get("features") or []), "code": check_embedding_code(params)}
    with stage_run(f"encode@{name}", Path(), used, [ENCODER, ENCODER_INFO, src], [dst],
                   tags) as run:
        digests = payload_digests(samples, data)
        rows, previous = previous_rows(dst, encoding, samples["sample_id"].tolist(), digests)
        todo = np.flatnonzero(rows < 0)
        embeddings = np.zeros((len(samples), int(info["dim"])), dtype=np.float32)
        if len(todo) < len(samples):
            embeddings[rows >= 0] = previous[rows[rows >= 0]]
        if len(todo):
            from pipeline.model.encoder import Encoder  # lazy: no ONNX Runtime when nothing is left to encode

            model = ENCODER.read_bytes()
            encoder = Encoder(info["name"], model, int(info.get("image_size") or 0), threads=threads)
            payloads = encoder_inputs(samples.iloc[todo], data)
            with Progress(transient=True) as progress:
                task = progress.add_task(f"encode {name}", total=len(payloads))
                # locally in this process, or as Ray tasks over fixed chunks: the encoder is batch-invariant
                fresh, chunks = run_encode(params, encoder, model, info["sha256"], payloads,
                                           progress=lambda done: progress.advance(task, done))
            embeddings[todo] = fresh
            run.children.extend(chunks)
        check_encoded(samples[["sample_id", "label"]], embeddings, dst, data["classes"], info.get("dim"))
        write_embeddings(dst, samples[["sample_id", "label"]].assign(**{PAYLOAD_DIGEST: digests}), embeddings,
                         metadata=encoding)
        run["samples"] = len(samples)
        run["encoded_samples"] = len(todo)
        print(f"encode {name}: encoded {len(todo)} of {len(samples)} samples, kept {len(samples) - len(todo)}")


if __name__ == "__main__":
    run_stage(main, *sys.argv[1:4])
