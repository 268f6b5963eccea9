"""The MLflow model registry: register each packaged build as a new version; promote it behind the gate.

Aliases: ``champion`` is what serves (``models:/<registered_model>@champion``); a version that fails the gate gets
``candidate`` and a tag saying why, so nobody has to guess why the champion did not move. A version built by a
DVC experiment (`dvc exp run`) is always a ``candidate``, tagged with the experiment's name: trying params is not a
release. Promotion stays a deliberate act: `legonet build` on the main line, or `legonet promote VERSION`. Aliases
belong to the registered model, which must be this project's (its ID): a project never moves another's champion.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import IdentityError, RegistryError

CHAMPION = "champion"
CANDIDATE = "candidate"
# what DVC sets for the stages of an experiment, queued or not (dvc/repo/experiments/queue/base.py), as the tags a
# version built by one carries
EXPERIMENT_TAGS = {"DVC_EXP_NAME": "dvc_exp_name", "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev"}


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
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
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


def project_root() -> Path:
    """The project's root: ``DVC_ROOT``, which DVC sets for every stage it runs, and which names the project itself
    (not the temporary copy under .dvc/tmp/exps a queued experiment runs in); else the working directory (a stage a
    forget runs in its own process)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def project_store(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The project's ``mlflow`` params with a relative SQLite store (the template's ``sqlite:///mlflow.db``) made
    absolute against ``project_root()``.

    A queued experiment (`dvc exp run --queue`, then `dvc queue start`) runs its stages in a temporary git copy of
    the project, where mlflow.db (not in git) does not exist: resolved against the working directory, the version
    would be registered in a new empty store, deleted with the copy. A server or an absolute path is kept.
    """
    uri = str(settings["tracking_uri"])
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return dict(settings)
    return {**settings, "tracking_uri": f"sqlite:///{(project_root() / uri.removeprefix('sqlite:///')).resolve()}"}


def dvc_experiment() -> dict[str, str]:
    """The tags naming the DVC experiment this stage runs in (empty for `dvc repro`, `legonet build`, a forget)."""
    return {tag: os.environ[env] for env, tag in EXPERIMENT_TAGS.items() if os.environ.get(env)}


def promote(name: str, version: str, result: GateResult, pid: str, experiment: Mapping[str, str] | None = None
            ) -> tuple[str, str]:
    """Point ``champion`` (gate passed) or ``candidate`` (held, or built by the DVC ``experiment``) at the version;
    returns the alias set and the reason recorded. An experiment's version records its gate result and its
    experiment, and waits for a deliberate `legonet promote`. The registered model and the version must be this
    project's (ID ``pid``): a project never moves another project's champion."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient

    from pipeline.errors import IdentityError
    from pipeline.tracking.identity import PROJECT_TAG, claim_registered_model

    client = MlflowClient()
    claim_registered_model(client, name, pid)
    owner = client.get_model_version(name, version).tags.get(PROJECT_TAG)
    if owner != pid:
        raise IdentityError(f"model version {version} of {name!r} carries project {owner}, not this project's {pid}: "
                            "refusing to point an alias at it")
    alias = CHAMPION if result.passed and not experiment else CANDIDATE
    reason = result.reason
    if experiment:
        reason += (f"; built by DVC experiment {experiment.get('dvc_exp_name', '?')}: a candidate, never champion "
                   f"(`legonet promote {version}` makes it champion)")
    for tag, value in {**(experiment or {}), "gate": "passed" if result.passed else "failed",
                       "gate_reason": reason}.items():
        client.set_model_version_tag(name, version, tag, value)
    client.set_registered_model_alias(name, alias, version)
    return alias, reason


def make_champion(name: str, chosen: str, pid: str) -> tuple[str, str | None]:
    """`legonet promote VERSION|EXPERIMENT`: point ``champion`` at an existing version, or at the newest version a
    DVC experiment of that name built, whatever its gate said, because a person chose it. The version is tagged
    with the one it replaces. Returns (the version now champion, the previous champion's or None). Like every
    alias this project sets, only on its own registered model and its own version (ID ``pid``)."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.identity import PROJECT_TAG, claim_registered_model

    client = MlflowClient()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", chosen):
        raise RegistryError(f"{chosen!r} is neither a version number nor a DVC experiment name")
    claim_registered_model(client, name, pid)
    if chosen.isdigit():
        try:
            version = client.get_model_version(name, chosen)
        except MlflowException as exc:
            raise RegistryError(f"registered model {name!r} has no version {chosen}; `mlflow ui` lists them") from exc
    else:
        found = client.search_model_versions(f"name='{name}' and tags.{EXPERIMENT_TAGS['DVC_EXP_NAME']}='{chosen}'")
        if not found:
            raise RegistryError(f"no version of {name!r} was built by a DVC experiment named {chosen!r}; "
                                "`dvc exp show` lists the experiments, `mlflow ui` the versions")
        newest = max(found, key=lambda v: int(v.version))
        version = client.get_model_version(name, newest.version)  # search results carry no aliases
    if version.tags.get(PROJECT_TAG) != pid:
        raise IdentityError(f"model version {version.version} of {name!r} carries project "
                            f"{version.tags.get(PROJECT_TAG)}, not this project's {pid}: refusing to promote it")
    try:
        previous: str | None = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        previous = None
    client.set_model_version_tag(name, version.version, "promoted",
                                 f"by `legonet promote`, replacing version {previous}")
    client.set_registered_model_alias(name, CHAMPION, version.version)
    if CANDIDATE in version.aliases:
        client.delete_registered_model_alias(name, CANDIDATE)
    return str(version.version), previous


def latest_version(name: str) -> Any | None:
    """The newest registered version of the model (every page searched), or None."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient

    from pipeline.tracking.identity import pages

    client = MlflowClient()
    versions = list(pages(lambda token: client.search_model_versions(f"name='{name}'", page_token=token)))
    return max(versions, key=lambda v: int(v.version)) if versions else None
