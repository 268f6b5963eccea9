"""DVC stage `encoder`: export the frozen pretrained encoder once; the exported file's digest is its identity."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.dataset import write_bytes_atomic
from pipeline.model.encoder import export_encoder
from pipeline.project.code import check_code
from pipeline.project.layout import ENCODER, ENCODER_INFO
from pipeline.project.params import load_params, run_stage
from pipeline.tracking.lineage import stage_run


def main() -> None:
    params = load_params()
    code = check_code(params, "encoder")  # no persisted output: DVC reruns the whole stage when its code entry changes
    encoder = params["encoder"]
    used = {"encoder": encoder, "data.features": params["data"].get("features") or [], "code": code}
    with stage_run("encoder", Path(), used, [], [ENCODER, ENCODER_INFO]) as run:
        ENCODER.parent.mkdir(parents=True, exist_ok=True)
        info = export_encoder(encoder["name"], int(encoder["image_size"]), ENCODER,
                              params["data"].get("features") or ())
        write_bytes_atomic(ENCODER_INFO, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
        run["dim"] = info["dim"]


if __name__ == "__main__":
    run_stage(main)
