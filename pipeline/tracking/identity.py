"""Project identity: the ID every MLflow object a project creates carries, so that on a shared `mlflow server`
a build registers, moves aliases and a forget purges only the project's own objects.

The ID is ``project.id`` in params.yaml: a random UUID made by `legonet init`, committed with the project, so every
clone has it. It never enters an artifact or a stage's params (two projects on the same data build the same bits);
it is the value of the tag ``legonet.project_id`` on the project's experiment, runs, registered model, model
versions and logged models. An experiment or a registered model is owned by the project whose ID it carries: a
project never logs into, registers into or purges from one another project owns, and one that carries no ID
(made before project IDs, or by hand) only after `legonet adopt` claims it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import IdentityError

PROJECT_TAG = "legonet.project_id"
DEFAULT_NAME = "legonet"  # the template's experiment and registered model name
_ID = re.compile(r"[0-9a-f]{32}")


def new_project_id() -> str:
    return uuid.uuid4().hex


def project_id(params: dict[str, Any]) -> str:
    """The project's ID from params.yaml, or IdentityError saying how to give a project made before IDs one."""
    value = (params.get("project") or {}).get("id")
    if not value:
        raise IdentityError("params.yaml has no project.id (the project was made before project IDs): run "
                            "`legonet adopt` once in the project; it gives the project an ID and claims its MLflow "
                            "experiment, registered model, versions, logged models and runs (docs/project-identity.md)")
    if not _ID.fullmatch(str(value)):
        raise IdentityError(f"params.yaml: project.id {value!r} is not a project ID (32 lowercase hex digits, as "
                            "`legonet init` makes them); restore it from git (`git log -p params.yaml`)")
    return str(value)


def suffixed(name: str, pid: str) -> str:
    """A name no other project picks: ``name`` with the first 8 hex digits of the ID."""
    return f"{name}-{pid[:8]}"


def shared_store(tracking_uri: str) -> bool:
    """Whether other projects can reach the store: anything but a SQLite file named relative to the project (the
    template's ``sqlite:///mlflow.db``, which lives inside the project folder)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).is_absolute()
    return True


def check_name(kind: str, name: str) -> None:
    """A name that goes into MLflow search filters must not hold their quote characters."""
    if not name or any(c in name for c in "'`\"\\"):
        raise IdentityError(f"params.yaml: {kind} {name!r} must be non-empty and hold no quote or backslash")


def _owner_problem(kind: str, name: str, tags: dict[str, str], pid: str, uri: str, key: str) -> str | None:
    owner = tags.get(PROJECT_TAG)
    if owner == pid:
        return None
    whose = f"project {owner}" if owner else "no project ID (made before project IDs, or by hand)"
    fix = (f"choose another name: `legonet init --set mlflow.{key}=NAME`, or set mlflow.{key} in params.yaml, e.g. "
           f"{suffixed(name, pid)!r}")
    if not owner:
        fix = f"if it is this project's, run `legonet adopt`; else {fix}"
    return f"{kind} {name!r} on {uri} carries {whose}, not this project's {pid}: {fix}"


def claim_experiment(client: Any, name: str, pid: str, artifact_location: str | None) -> str:
    """The ID of experiment ``name``, created with this project's tag if missing; IdentityError if another
    project (or none) owns it."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow.exceptions import MlflowException

    check_name("mlflow.experiment", name)
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags={PROJECT_TAG: pid})
        except MlflowException as exc:  # a concurrent process created it first: judge that one
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
    problem = _owner_problem("experiment", name, found.tags, pid, client.tracking_uri, "experiment")
    if problem:
        raise IdentityError(problem)
    return found.experiment_id


def claim_registered_model(client: Any, name: str, pid: str) -> None:
    """Create registered model ``name`` with this project's tag if missing; IdentityError if another project owns
    it, or if it carries no ID and holds versions (an empty untagged model is claimed: it holds nothing)."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow.exceptions import MlflowException

    check_name("mlflow.registered_model", name)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, tags={PROJECT_TAG: pid})
            return
        except MlflowException as again:
            if again.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            model = client.get_registered_model(name)
    if not model.tags.get(PROJECT_TAG) and not client.search_model_versions(f"name='{name}'", max_results=1):
        client.set_registered_model_tag(name, PROJECT_TAG, pid)
        return
    problem = _owner_problem("registered model", name, model.tags, pid, client.tracking_uri, "registered_model")
    if problem:
        raise IdentityError(problem)


def pages(search: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every result of an MLflow search, page by page (each call returns one page and a token for the next)."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def logged_model_of(version: Any) -> str | None:
    """The logged model a model version serves (its ``model_id``, else the ``models:/m-...`` source)."""
    source = str(version.source)
    return getattr(version, "model_id", None) or (source.split("/")[1] if source.startswith("models:/m-") else None)


def project_experiments(client: Any, pid: str) -> list[str]:
    """IDs of every active experiment carrying this project's ID, through every page."""
    return [e.experiment_id for e in pages(lambda token: client.search_experiments(
        filter_string=f"tags.`{PROJECT_TAG}` = '{pid}'", page_token=token))]


def choose_names(tracking_uri: str, pid: str, experiment: str, registered_model: str, user_set: set[str],
                 artifact_location: str | None) -> dict[str, str]:
    """The experiment and registered model names a new project uses, claimed on a shared store.

    A project's own SQLite store needs nothing. On a shared store, names the user set are claimed or refused; the
    template's ``legonet`` is kept when free and otherwise both names get the ID's short form, so two projects made
    with default names never share an experiment, a registered model or its ``champion`` alias. Claiming (creating
    the experiment and registered model with the project's tag) at init, not at the first build, keeps two projects
    initialised one after the other from picking the same free name.
    """
    names = {"experiment": experiment, "registered_model": registered_model}
    for key, name in names.items():
        check_name(f"mlflow.{key}", name)
    if not shared_store(tracking_uri):
        return names
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    defaults = [key for key, name in names.items() if name == DEFAULT_NAME and f"mlflow.{key}" not in user_set]
    if defaults and any(_taken(client, key, DEFAULT_NAME, pid) for key in defaults):
        names.update({key: suffixed(DEFAULT_NAME, pid) for key in defaults})
    try:
        claim_experiment(client, names["experiment"], pid, artifact_location)
        claim_registered_model(client, names["registered_model"], pid)
    except Exception as exc:
        if isinstance(exc, IdentityError):
            raise
        raise IdentityError(f"cannot reach the MLflow store {tracking_uri} to claim the project's names: {exc}; "
                            "start it, or choose another mlflow.tracking_uri") from exc
    return names


def _taken(client: Any, key: str, name: str, pid: str) -> bool:
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow.exceptions import MlflowException

    if key == "experiment":
        found = client.get_experiment_by_name(name)
        return found is not None and found.tags.get(PROJECT_TAG) != pid
    try:
        return client.get_registered_model(name).tags.get(PROJECT_TAG) != pid
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
