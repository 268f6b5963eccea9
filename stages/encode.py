"""DVC stage `encode@NAME`: validate one sample table and write its embeddings (sample_id, label, embedding).

Contracts: the sample table is checked against ``samples_schema`` when read and the embeddings against
``encoded_schema`` (the encoder's width, finite float32) before anything is written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.progress import Progress

from pipeline.contracts import check_encoded, samples_contract, validate
from pipeline.dataset import encoder_inputs, read_table, write_embeddings
from pipeline.encoder import Encoder
from pipeline.executor import executor_of, run_encode
from pipeline.layout import ENCODER, ENCODER_INFO
from pipeline.lineage import stage_run
from stages.project import load_params, run_stage


def main(name: str, src: Path, dst: Path) -> None:
    params = load_params()
    data, threads = params["data"], int(params["encoder"]["threads"])
    info = json.loads(ENCODER_INFO.read_text())
    samples = validate(read_table(src), samples_contract(data), src)
    used = {"data": data, "encoder.threads": threads}
    tags = {"encoder.sha256": info.get("weights_sha256", ""), "encoder.name": info["name"]}
    tags["legonet.executor"] = executor_of(params)
    with stage_run(f"encode@{name}", Path(), used, [ENCODER, ENCODER_INFO, src], [dst],
                   tags) as run:
        model = ENCODER.read_bytes()
        encoder = Encoder(info["name"], model, int(info.get("image_size") or 0), threads=threads)
        payloads = encoder_inputs(samples, data)
        with Progress(transient=True) as progress:
            task = progress.add_task(f"encode {name}", total=len(payloads))
            # locally in this process, or as Ray tasks over fixed chunks: the encoder is batch-invariant
            embeddings, chunks = run_encode(params, encoder, model, info["sha256"], payloads,
                                            progress=lambda done: progress.advance(task, done))
        check_encoded(samples[["sample_id", "label"]], embeddings, dst, data["classes"], info.get("dim"))
        write_embeddings(dst, samples[["sample_id", "label"]], embeddings)
        run.children.extend(chunks)
        run["samples"] = len(samples)


if __name__ == "__main__":
    run_stage(main, sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
