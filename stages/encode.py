"""DVC stage `encode@NAME`: validate one sample table and write its embeddings (sample_id, label, embedding)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.progress import Progress

from pipeline.dataset import check_samples, image_arrays, read_table, write_embeddings
from pipeline.encoder import Encoder
from pipeline.executor import executor_of, run_encode
from pipeline.layout import ENCODER, ENCODER_INFO
from pipeline.lineage import stage_run
from stages.project import load_params


def main(name: str, src: Path, dst: Path) -> None:
    params = load_params()
    data, threads = params["data"], int(params["encoder"]["threads"])
    info = json.loads(ENCODER_INFO.read_text())
    samples = check_samples(read_table(src), src, data["modality"], data["classes"], data.get("image_shape"))
    used = {"data": data, "encoder.threads": threads}
    tags = {"encoder.sha256": info.get("weights_sha256", ""), "encoder.name": info["name"]}
    tags["legonet.executor"] = executor_of(params)
    with stage_run(f"encode@{name}", Path(), used, [ENCODER, ENCODER_INFO, src], [dst],
                   tags) as run:
        model = ENCODER.read_bytes()
        encoder = Encoder(info["name"], model, int(info.get("image_size") or 0), threads=threads)
        payloads = image_arrays(samples, data["image_shape"]) if data["modality"] == "image" else list(
            samples["text"])
        with Progress(transient=True) as progress:
            task = progress.add_task(f"encode {name}", total=len(payloads))
            # locally in this process, or as Ray tasks over fixed chunks: the encoder is batch-invariant
            embeddings, chunks = run_encode(params, encoder, model, info["sha256"], payloads,
                                            progress=lambda done: progress.advance(task, done))
        write_embeddings(dst, samples[["sample_id", "label"]], embeddings)
        run.children.extend(chunks)
        run["samples"] = len(samples)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
