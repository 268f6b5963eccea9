"""The packaged model's MLflow signature and input example: functions of the package config alone.

The package's files are compared bit for bit with a from-scratch build (the exactness oracle), so neither may
depend on anything but the config: the example is a blank payload of the right shape, never a sample (a sample in
the package would be data the forget has to find), and the schema names the columns ``predict_frame`` reads and
writes. The ``quarantine`` param lists adapters the model must not consult (issue 23: the server passes the
registry's quarantine on every call).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

QUARANTINE_PARAM = "quarantine"


def input_example(config: dict[str, Any]) -> pd.DataFrame:
    """One request row: a black image (its pixels as a list), an empty text, or zeros for a table's features."""
    if config["modality"] == "text":
        return pd.DataFrame({"text": [""]})
    if config["modality"] == "table":
        return pd.DataFrame({name: [0.0] for name in config["features"]})
    pixels = 1
    for side in config["image_shape"]:
        pixels *= int(side)
    return pd.DataFrame({"image": [[0] * pixels]})


def model_signature(config: dict[str, Any]) -> Any:
    """Input, output and params schema of ``LegoNetModel.predict``.

    An image is raw uint8 bytes (a Parquet file's column) or a list of pixel values (JSON): MLflow's column types
    have no union of binary and array, so the column is ``Any`` and the model checks each image's size itself.
    """
    # lazy: the package stage imports MLflow anyway; the model subpackage otherwise never needs it
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    if config["modality"] == "text":
        inputs = [ColSpec(DataType.string, "text")]
    elif config["modality"] == "table":
        inputs = [ColSpec(DataType.double, name) for name in config["features"]]
    else:
        inputs = [ColSpec(AnyType(), "image")]
    classes = list(config["classes"])
    label = DataType.string if any(isinstance(c, str) for c in classes) else DataType.long
    outputs = [ColSpec(label, "prediction"), *(ColSpec(DataType.float, f"proba_{c}") for c in classes),
               ColSpec(DataType.string, "adapters")]
    params = ParamSchema([ParamSpec(QUARANTINE_PARAM, DataType.long, [], (-1,))])
    return ModelSignature(Schema(inputs), Schema(outputs), params)
