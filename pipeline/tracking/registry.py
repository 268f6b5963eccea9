"""The MLflow model registry: register each packaged build as a new version; promote it behind the gate.

Aliases: ``champion`` is what serves (``models:/<registered_model>@champion``); a version that fails the gate gets
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


@dataclass(frozen=True)
class Replaced:
    """The version a new build replaces (what serves now: the champion, else the newest version) and its
    recorded test accuracy."""

    version: str
    accuracy: float


def gate(accuracy: float, replaced: Replaced | None, params: dict[str, Any],
         extra_failures: list[str] | None = None) -> GateResult:
    """Judge a build against the version it replaces: its accuracy may drop at most ``gate.max_drop`` below that
    version's recorded accuracy. ``gate.min_accuracy`` is an absolute floor only when the user sets one (null by
    default): no fixed figure suits every dataset, so the first build of a user's data becomes champion unless
    the quality checkpoint (``extra_failures``) or a floor the user chose holds it back."""
    failures = list(extra_failures or [])
    floor, max_drop = params.get("min_accuracy"), float(params["max_drop"])
    if not math.isfinite(accuracy):
        failures.append(f"accuracy {accuracy} is not a number (no test samples?)")
    if floor is not None and accuracy < float(floor):
        failures.append(f"accuracy {accuracy:.4f} below gate.min_accuracy {float(floor):.4f}")
    if replaced is not None and replaced.accuracy - accuracy > max_drop:
        failures.append(f"accuracy {accuracy:.4f} drops {replaced.accuracy - accuracy:.4f} below the "
                        f"{replaced.accuracy:.4f} of version {replaced.version}, the version it replaces "
                        f"(gate.max_drop {max_drop:.4f})")
    if failures:
        return GateResult(False, "; ".join(failures))
    if replaced is None:
        against = "first version: nothing to compare against" + (
            f", and at least gate.min_accuracy {float(floor):.4f}" if floor is not None
            else " and no gate.min_accuracy set")
    else:
        against = (f"within gate.max_drop {max_drop:.4f} of the {replaced.accuracy:.4f} of version "
                   f"{replaced.version}, the version it replaces")
    return GateResult(True, f"accuracy {accuracy:.4f} passes the gate: {against}")


def replaced_version(name: str) -> Replaced | None:
    """The version a new build replaces: the champion, else the newest version (what `legonet predict` serves),
    with its ``accuracy`` tag; None when no version with a recorded accuracy exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        latest = latest_version(name)  # search results may omit tags: read the version itself
        version = client.get_model_version(name, latest.version) if latest is not None else None
    value = version.tags.get("accuracy") if version is not None else None
    return Replaced(str(version.version), float(value)) if value is not None else None


def promote(name: str, version: str, result: GateResult, pid: str) -> str:
    """Point ``champion`` (gate passed) or ``candidate`` (held) at the version; returns the alias set.

    Aliases belong to the registered model, so the model must be this project's (ID ``pid``) and so must the
    version: a project never moves another project's champion."""
    from mlflow import MlflowClient

    from pipeline.tracking.identity import PROJECT_TAG, IdentityError, claim_registered_model

    client = MlflowClient()
    claim_registered_model(client, name, pid)
    owner = client.get_model_version(name, version).tags.get(PROJECT_TAG)
    if owner != pid:
        raise IdentityError(f"model version {version} of {name!r} carries project {owner}, not this project's {pid}: "
                            "refusing to point an alias at it")
    alias = CHAMPION if result.passed else CANDIDATE
    client.set_model_version_tag(name, version, "gate", "passed" if result.passed else "failed")
    client.set_model_version_tag(name, version, "gate_reason", result.reason)
    client.set_registered_model_alias(name, alias, version)
    return alias


def latest_version(name: str) -> Any | None:
    """The newest registered version of the model (every page searched), or None."""
    from mlflow import MlflowClient

    from pipeline.tracking.identity import pages

    client = MlflowClient()
    versions = list(pages(lambda token: client.search_model_versions(f"name='{name}'", page_token=token)))
    return max(versions, key=lambda v: int(v.version)) if versions else None
