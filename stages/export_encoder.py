"""DVC stage `encoder`: export the frozen pretrained encoder once; the exported file's digest is its identity."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.dataset import write_bytes_atomic
from pipeline.encoder import export_encoder
from pipeline.layout import ENCODER, ENCODER_INFO
from pipeline.lineage import stage_run
from stages.project import load_params


def main() -> None:
    params = load_params()
    encoder = params["encoder"]
    used = {"encoder": encoder, "data.features": params["data"].get("features") or []}
    with stage_run("encoder", Path(), used, [], [ENCODER, ENCODER_INFO]) as run:
        ENCODER.parent.mkdir(parents=True, exist_ok=True)
        info = export_encoder(encoder["name"], int(encoder["image_size"]), ENCODER,
                              params["data"].get("features") or ())
        write_bytes_atomic(ENCODER_INFO, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
        run["dim"] = info["dim"]


if __name__ == "__main__":
    main()
