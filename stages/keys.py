"""DVC stage `keys`: fit the projection and the adapter keys on the non-deletable reference split only, and the
reference split's held-out embedding norms that the quality checkpoint's norm rule is learned from."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from pipeline.data.contracts import check_encoded
from pipeline.data.dataset import read_embeddings, write_bytes_atomic
from pipeline.data.quality import held_out_features, norm_bounds
from pipeline.model.keys import fit_keys, fit_projection, project
from pipeline.project.code import check_code
from pipeline.project.layout import ENCODED_REFERENCE, KEYS, PROJECTION, REFERENCE_NORMS
from pipeline.project.params import load_params, run_stage
from pipeline.tracking.lineage import stage_run


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save to bytes then an atomic write: .npy holds no timestamps, so equal arrays give equal files."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())


def main() -> None:
    params = load_params()
    code = check_code(params, "keys")  # no persisted output: DVC reruns the whole stage when its code entry changes
    reference = ENCODED_REFERENCE
    classes = list(params["data"]["classes"])
    used = {"projection": params["projection"], "keys": params["keys"], "adapters.n": params["adapters"]["n"],
            "data.classes": classes, "encoder.name": params["encoder"]["name"], "code": code}
    with stage_run("keys", Path(), used, [reference], [PROJECTION, KEYS, REFERENCE_NORMS]) as run:
        frame, embeddings = read_embeddings(reference)
        check_encoded(frame, embeddings, reference, classes, None)
        # tables (encoder `none`): columns in unrelated units, standardised with the reference split's statistics
        projection = fit_projection(embeddings, int(params["projection"]["dim"]),
                                    standardise=params["encoder"]["name"] == "none")
        keys = fit_keys(project(embeddings, projection), int(params["adapters"]["n"]),
                        int(params["keys"]["seed"]), int(params["keys"]["iterations"]))
        # the quality checkpoint's norm rule: learned here, off the forget path (the reference split never changes)
        bounds = norm_bounds(held_out_features(embeddings, projection))
        save_array(PROJECTION, projection)
        save_array(KEYS, keys)
        write_bytes_atomic(REFERENCE_NORMS, (json.dumps(bounds, indent=1, sort_keys=True) + "\n").encode())
        run["reference_samples"] = embeddings.shape[0]


if __name__ == "__main__":
    run_stage(main)
