"""The MLflow model registry: register each packaged build as a new version; promote it behind the gate.

Aliases: ``champion`` is what serves (``models:/legonet@champion``); a version that fails the gate gets
``candidate`` and a tag saying why, so nobody has to guess why the champion did not move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHAMPION = "champion"
CANDIDATE = "candidate"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str


def gate(accuracy: float, champion_accuracy: float | None, params: dict[str, Any],
         extra_failures: list[str] | None = None) -> GateResult:
    """Accuracy must reach ``min_accuracy`` and drop at most ``max_drop`` below the current champion."""
    failures = list(extra_failures or [])
    if not math.isfinite(accuracy) or accuracy < float(params["min_accuracy"]):
        failures.append(f"accuracy {accuracy:.4f} below gate.min_accuracy {float(params['min_accuracy']):.4f}")
    if champion_accuracy is not None and champion_accuracy - accuracy > float(params["max_drop"]):
        failures.append(f"accuracy {accuracy:.4f} drops {champion_accuracy - accuracy:.4f} below the champion's "
                        f"{champion_accuracy:.4f} (gate.max_drop {float(params['max_drop']):.4f})")
    if failures:
        return GateResult(False, "; ".join(failures))
    return GateResult(True, f"accuracy {accuracy:.4f} passes the gate")


def champion_accuracy(name: str) -> float | None:
    """Accuracy tag of the current champion version, or None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = version.tags.get("accuracy")
    return float(value) if value is not None else None


def promote(name: str, version: str, result: GateResult) -> str:
    """Point ``champion`` (gate passed) or ``candidate`` (held) at the version; returns the alias set."""
    from mlflow import MlflowClient

    client = MlflowClient()
    alias = CHAMPION if result.passed else CANDIDATE
    client.set_model_version_tag(name, version, "gate", "passed" if result.passed else "failed")
    client.set_model_version_tag(name, version, "gate_reason", result.reason)
    client.set_registered_model_alias(name, alias, version)
    return alias


def latest_version(name: str) -> Any | None:
    """The newest registered version of the model, or None."""
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name='{name}'")
    return max(versions, key=lambda v: int(v.version)) if versions else None
