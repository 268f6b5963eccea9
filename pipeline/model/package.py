"""The packaged model: encoder + projection + keys + adapters as one MLflow pyfunc model.

The package holds exactly the bytes of the DVC-tracked artifacts (copied, never re-serialised), so its digests
can be checked against ``dvc.lock`` and the audit record. Serving needs numpy, onnxruntime and safetensors only;
torch is never imported at inference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:  # the package is loaded inside MLflow's model server, where mlflow is always present
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a hard dependency of the project
    PythonModel = object  # type: ignore[misc,assignment]

SERVING_REQUIREMENTS = ["numpy", "pandas", "pyarrow", "onnxruntime", "safetensors"]


class LegoNetModel(PythonModel):
    """pyfunc model. Input: a DataFrame with an ``image`` column (raw uint8 bytes, or a list of pixel values,
    row-major ``image_shape``), a ``text`` column, or a table's feature columns. Output: ``prediction`` (the class
    name or index of ``data.classes``) plus ``proba_<class>`` columns and ``adapters`` (the adapters each sample
    consulted). ``params={"quarantine": [adapter numbers]}``: adapters never consulted (the registry's
    ``legonet.quarantine`` tag of the version, pipeline.tracking.quarantine)."""

    def load_context(self, context: Any) -> None:
        # lazy: MLflow unpickles this class to log and register it; ONNX Runtime loads only when it is served
        from pipeline.model.encoder import Encoder
        from pipeline.model.ensemble import load_ensemble

        artifacts = {name: Path(path) for name, path in context.artifacts.items()}
        self.config = json.loads(artifacts["config"].read_text())
        info = json.loads(artifacts["encoder_info"].read_text())
        self.encoder = Encoder(info["name"], artifacts["encoder"], int(info.get("image_size") or 0),
                               threads=int(self.config["threads"]))
        self.ensemble = load_ensemble(artifacts["projection"], artifacts["keys"], artifacts["adapters"],
                                      int(self.config["k"]), list(self.config["classes"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        return predict_frame(self.encoder, self.ensemble, self.config, model_input, quarantine_param(params))


def quarantine_param(params: dict[str, Any] | None) -> list[int]:
    """The ``quarantine`` param as adapter numbers, with a clear error for anything else."""
    value = (params or {}).get("quarantine")
    if value is None:
        return []
    items = value.tolist() if isinstance(value, np.ndarray) else value
    if not isinstance(items, list | tuple) or not all(
            isinstance(a, int | np.integer) and not isinstance(a, bool) for a in items):
        raise ValueError(f"params quarantine must be a list of adapter numbers, not {value!r}")
    return sorted({int(a) for a in items})


def payloads(frame: pd.DataFrame, config: dict[str, Any]) -> list[Any]:
    """The encoder's inputs from a request frame, with a clear error for a wrong column or image shape."""
    if config["modality"] == "text":
        if "text" not in frame.columns:
            raise ValueError("input needs a `text` column")
        return [str(t) for t in frame["text"]]
    if config["modality"] == "table":
        missing = [c for c in config["features"] if c not in frame.columns]
        if missing:
            raise ValueError(f"input needs the feature column(s) {missing} (numbers)")
        try:
            return frame[config["features"]].to_numpy(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"feature columns must hold numbers: {exc}") from exc
    if "image" not in frame.columns:
        raise ValueError("input needs an `image` column (raw uint8 bytes or a list of pixel values)")
    shape = tuple(int(s) for s in config["image_shape"])
    images = []
    for row, value in enumerate(frame["image"]):
        pixels = (np.frombuffer(value, dtype=np.uint8) if isinstance(value, bytes | bytearray)
                  else np.asarray(value, dtype=np.float64).reshape(-1).clip(0, 255).astype(np.uint8))
        if pixels.size != int(np.prod(shape)):
            raise ValueError(f"row {row}: image has {pixels.size} pixels, expected {'x'.join(map(str, shape))}")
        images.append(pixels.reshape(shape))
    return images


def predict_frame(encoder: Any, ensemble: Any, config: dict[str, Any], frame: pd.DataFrame,
                  quarantine: list[int] | None = None) -> pd.DataFrame:
    proba, activated = ensemble.predict_proba(encoder.encode(payloads(frame, config)), quarantine or [])
    classes = list(config["classes"])
    out = pd.DataFrame({"prediction": np.asarray(classes)[proba.argmax(axis=1)]})
    for i, c in enumerate(classes):
        out[f"proba_{c}"] = proba[:, i]
    out["adapters"] = [" ".join(str(int(a)) for a in row) for row in activated]
    return out


def stage_artifacts(staging: Path, files: dict[str, Path], config: dict[str, Any]) -> dict[str, str]:
    """Copy the artifact files byte for byte into ``staging/artifacts`` and return MLflow's ``artifacts`` mapping,
    with paths relative to ``staging`` (the package is saved from there: see ``stages.package.main``)."""
    workdir = staging / "artifacts"
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    for name, src in files.items():
        dst = workdir / src.name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".gitignore"))
        else:
            shutil.copyfile(src, dst)
        artifacts[name] = dst.relative_to(staging).as_posix()
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    artifacts["config"] = config_path.relative_to(staging).as_posix()
    return artifacts
