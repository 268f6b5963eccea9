"""`legonet adopt`: give a project made before project IDs its ID and claim its MLflow objects."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cli.output import console
from pipeline.errors import IdentityError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adopt", help="give a project made before project IDs its ID and claim its MLflow objects")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: MLflow loads only for the commands that need it
    from pipeline.forget.flow import project_lock

    with project_lock(Path.cwd(), wait=True, notify=lambda m: console.print(m, highlight=False)):
        done = adopt(Path.cwd())
    print(f"project ID {done['project_id']} (params.yaml, committed): claimed the experiment, {done['runs']} run(s), "
          f"the registered model, {done['model_versions']} version(s) and {done['logged_models']} logged model(s)")
    return 0


def adopt(root: Path) -> dict[str, Any]:
    """Give a project made before project IDs its ID and claim its MLflow objects: the experiment, its runs, the
    registered model, its versions and their logged models. Objects that already carry this ID stay as they are;
    if any carries another project's ID nothing is changed and IdentityError names it (the names are then shared
    with that project: set new ones in params.yaml and build). Commits params.yaml. Returns the counts tagged."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.project.init import write_project_id
    from pipeline.project.params import PARAMS, load_params
    from pipeline.runner.build import commit_project
    from pipeline.tracking.identity import PROJECT_TAG, logged_model_of, new_project_id, pages, project_id
    from pipeline.tracking.lineage import absolute_store

    params = load_params(root)
    pid = (params.get("project") or {}).get("id") or new_project_id()
    project_id({"project": {"id": pid}})
    settings = params["mlflow"]
    uri, experiment, name = absolute_store(settings["tracking_uri"], root), settings["experiment"], \
        settings["registered_model"]
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = list(pages(lambda token: client.search_runs([found.experiment_id], page_token=token))) if found else []
    try:
        model_tags: dict[str, str] | None = client.get_registered_model(name).tags
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        model_tags = None  # never built: nothing registered to claim
    listed = [] if model_tags is None else list(pages(
        lambda token: client.search_model_versions(f"name='{name}'", page_token=token)))
    versions = [client.get_model_version(name, v.version) for v in listed]  # search results may omit tags
    owners = [("experiment", experiment, found.tags if found else {}), ("registered model", name, model_tags or {}),
              *[("run", r.info.run_id, r.data.tags) for r in runs],
              *[("model version", f"{name}/{v.version}", v.tags) for v in versions]]
    foreign = [f"{kind} {label!r} carries project {tags[PROJECT_TAG]}" for kind, label, tags in owners
               if tags.get(PROJECT_TAG) not in (None, pid)]
    if foreign:
        raise IdentityError(f"cannot adopt: {'; '.join(foreign[:5])}; this project's names are another project's: "
                            "set mlflow.experiment and mlflow.registered_model in params.yaml to new names and build")
    if found is not None and found.tags.get(PROJECT_TAG) != pid:
        client.set_experiment_tag(found.experiment_id, PROJECT_TAG, pid)
    for run in runs:
        if run.data.tags.get(PROJECT_TAG) != pid:
            client.set_tag(run.info.run_id, PROJECT_TAG, pid)
    if model_tags is not None and model_tags.get(PROJECT_TAG) != pid:
        client.set_registered_model_tag(name, PROJECT_TAG, pid)
    logged = 0
    for version in versions:
        for key in (PROJECT_TAG, "project"):
            client.set_model_version_tag(name, version.version, key, pid)
        model_id = logged_model_of(version)
        if model_id:
            client.set_logged_model_tags(model_id, {PROJECT_TAG: pid})
            logged += 1
    write_project_id(root / PARAMS, pid)
    commit_project(root, f"legonet adopt: project ID {pid}")
    return {"project_id": pid, "runs": len(runs), "model_versions": len(versions), "logged_models": logged}
