"""Score a file of samples with the registered champion (or the newest version): `legonet predict`, under the
quarantine the registry holds for that version (pipeline.tracking.quarantine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.data.dataset import read_samples
from pipeline.errors import ModelError
from pipeline.project.params import load_params
from pipeline.tracking.quarantine import adapters_of


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
    client = mlflow.MlflowClient()
    if model_uri is None:
        model_uri = f"models:/{name}@{CHAMPION}"
        try:
            client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            latest = latest_version(name)
            if latest is None:
                raise ModelError(f"no version of model {name!r} is registered; run `legonet build` first") from None
            model_uri = f"models:/{name}/{latest.version}"
    try:
        version = _registered(client, model_uri)  # an alias resolved once: the quarantine is that version's
        model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}" if version else model_uri)
        quarantine = adapters_of(version.tags) if version else []
    except ValueError as exc:  # a malformed quarantine tag
        raise ModelError(f"{model_uri}: {exc}; fix or delete the tag in the registry") from exc
    except MlflowException as exc:
        raise ModelError(f"cannot load {model_uri}: {exc}") from exc
    try:  # the payload columns (image, text or a table's features); the model says which one it misses
        # through the python model itself: a version registered before its signature declared the quarantine
        # param would have pyfunc drop the param (with a warning) and answer unquarantined
        result = model.unwrap_python_model().predict(None, samples.drop(columns=["sample_id", "label"],
                                                                        errors="ignore"), {"quarantine": quarantine})
    except ValueError as exc:
        raise ModelError(f"{file}: {exc}") from exc
    if "sample_id" in samples.columns:
        result.insert(0, "sample_id", samples["sample_id"].to_numpy())
    return result


def _registered(client: Any, model_uri: str) -> Any | None:
    """The registered version ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names; None for another URI (a
    run, a path): no registry entry, so no quarantine."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", model_uri)
    if match is None:
        return None
    name, number, alias = match.groups()
    return client.get_model_version(name, number) if number else client.get_model_version_by_alias(name, alias)
