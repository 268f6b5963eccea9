"""Score a file of samples with the registered champion (or the newest version): `legonet predict`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.dataset import read_samples
from pipeline.errors import ModelError
from pipeline.project.params import load_params


def predict_file(root: Path, file: Path, model_uri: str | None = None) -> pd.DataFrame:
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.lineage import configure
    from pipeline.tracking.registry import CHAMPION, latest_version

    params = load_params(root)
    configure(params["mlflow"]["tracking_uri"], params["mlflow"]["experiment"], root)
    name = params["mlflow"]["registered_model"]
    samples = read_samples(file)
    if model_uri is None:
        model_uri = f"models:/{name}@{CHAMPION}"
        try:
            mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            latest = latest_version(name)
            if latest is None:
                raise ModelError(f"no version of model {name!r} is registered; run `legonet build` first") from None
            model_uri = f"models:/{name}/{latest.version}"
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise ModelError(f"cannot load {model_uri}: {exc}") from exc
    try:  # the payload columns (image, text or a table's features); the model says which one it misses
        result = model.predict(samples.drop(columns=["sample_id", "label"], errors="ignore"))
    except ValueError as exc:
        raise ModelError(f"{file}: {exc}") from exc
    if "sample_id" in samples.columns:
        result.insert(0, "sample_id", samples["sample_id"].to_numpy())
    return result
