"""DVC stage `package`: the whole ensemble, encoder included, as an MLflow pyfunc model; register and gate it.

The gate: alias `champion` moves only when the quality checkpoint (reports/quality/result.json) passed and the
accuracy gate passed, and the build is not a DVC experiment (`dvc exp run`, queued or not: a candidate tagged with
the experiment's name, for `legonet promote`); otherwise the version is `candidate`, tagged with every failed
expectation or gate. The model is registered in the project's own MLflow store, also from the temporary copy a
queued experiment runs in (``project_store``).

This is also where pending lineage records of the build become MLflow runs (the stage imports MLflow anyway).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import pipeline
from pipeline.data.quality import RESULT, read_result
from pipeline.forget.requests import held, now, stamp
from pipeline.model.package import SERVING_REQUIREMENTS, stage_artifacts
from pipeline.model.signature import input_example, model_signature
from pipeline.project.code import check_code
from pipeline.project.layout import ADAPTERS, ENCODER, ENCODER_INFO, KEYS, METRICS, PACKAGE, PROJECTION
from pipeline.project.params import load_params, run_stage
from pipeline.project.scratch import scratch_dir
from pipeline.tracking import quarantine
from pipeline.tracking.identity import PROJECT_TAG, claim_registered_model, project_id
from pipeline.tracking.lineage import configure, file_md5, file_sha256, flush, stage_run, tree_digests
from pipeline.tracking.registry import (
    dvc_experiment,
    gate,
    project_root,
    project_store,
    promote,
    replaced_version,
)


def preload() -> None:
    """What the stage does first, done ahead by a forget's stage worker: MLflow imported, the project's store opened,
    and MLflow's map of installed packages built (``save_model`` checks the serving requirements against it by
    reading every installed distribution's metadata, once per process).

    It runs before the forget has checked its request, so it only reads: a SQLite store that does not exist yet is
    left alone (opening it would create it), and the experiment is looked up, never created (``configure`` does
    that when the stage runs)."""
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    import mlflow
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    settings = project_store(load_params()["mlflow"])
    uri = settings["tracking_uri"]
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file():
        mlflow.set_tracking_uri(uri)
        mlflow.get_experiment_by_name(settings["experiment"])  # opens (and caches) the store
    warn_dependency_requirement_mismatches(SERVING_REQUIREMENTS)


def main() -> None:
    # MLflow copies each of the 2n adapter files with a progress bar per file group: thousands of lines in DVC's log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # lazy: MLflow imported only where needed (seconds), not by every command and stage
    import mlflow

    params = load_params()
    code = check_code(params, "package")  # no persisted output: DVC reruns the whole stage when its code entry changes
    data, k, name = params["data"], int(params["adapters"]["k"]), params["mlflow"]["registered_model"]
    config = {"modality": data["modality"], "image_shape": data.get("image_shape"), "classes": data["classes"],
              "features": data.get("features") or [], "k": k, "threads": int(params["encoder"]["threads"])}
    files = {"encoder": ENCODER, "encoder_info": ENCODER_INFO, "projection": PROJECTION, "keys": KEYS,
             "adapters": ADAPTERS}
    metrics_file = METRICS / "evaluate.json"
    used = {"package": config, "gate": params["gate"], "registered_model": name, "code": code}
    store = project_store(params["mlflow"])  # the project's store, also from a queued experiment's copy
    configure(store["tracking_uri"], store["experiment"], project_root())
    owner = {PROJECT_TAG: project_id(params)}  # on the logged model and, through log_model, on the version
    claim_registered_model(mlflow.MlflowClient(), name, owner[PROJECT_TAG])  # before log_model creates it untagged
    # not /tmp: a killed build would leave whole adapters there; kept until the version is logged from it
    with scratch_dir(Path(), "package") as tmp:
        staging = Path(tmp)
        with stage_run("package", Path(), used, [*files.values(), metrics_file, RESULT], [PACKAGE]) as run:
            accuracy = float(json.loads(metrics_file.read_text())["accuracy"])
            artifacts = stage_artifacts(staging, files, config)
            shutil.copytree(Path(pipeline.__file__).parent, staging / "code" / "pipeline",
                            ignore=shutil.ignore_patterns("__pycache__", "template"))  # template: not serving code
            # models from code: the package holds served.py's source, never a pickled object. MLflow records its
            # absolute path (only its name is used to load): the installed file's, the same for every build here
            model = {"python_model": str(Path(pipeline.__file__).parent / "model" / "served.py"),
                     "artifacts": artifacts, "code_paths": ["code/pipeline"], "pip_requirements": SERVING_REQUIREMENTS,
                     "signature": model_signature(config), "input_example": input_example(config)}
            if PACKAGE.exists():
                shutil.rmtree(PACKAGE)
            previous = replaced_version(name)  # before this build registers: the version it replaces
            package = PACKAGE.resolve()  # before the working directory changes
            # from inside the staging folder: MLflow writes each artifact's source, as given, into MLmodel (`uri`);
            # relative (``artifacts/keys.npy``) it names the file in the package, never a temporary folder whose
            # random name would differ between two builds (the tracking URI is absolute: ``project_store``)
            with contextlib.chdir(staging):
                mlflow.pyfunc.save_model(path=str(package), **model)
            quality = read_result(RESULT)
            holds = [] if quality["success"] else [f"quality checkpoint failed: {line}" for line in quality["failed"]]
            result = gate(accuracy, previous, params["gate"], holds)
            run.update({"accuracy": accuracy})
        runs = flush(Path(), store)
        # registered once the stage's run exists: the version (and its logged model) link to the run that made it
        with contextlib.chdir(staging):
            logged = mlflow.models.Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc,
                                             run_id=runs["package"], registered_model_name=name, tags=owner, **model)
            version = str(logged.registered_model_version)
    client = mlflow.MlflowClient()
    # `project` names the project by its ID, never by a folder path (a clone elsewhere is the same project)
    tags = {"accuracy": f"{accuracy:.6f}", "package_run_id": runs.get("package", ""), "project": owner[PROJECT_TAG],
            "encoder.md5": file_md5(ENCODER), "adapters": str(len(list(ADAPTERS.rglob("*.safetensors")))),
            "inputs.md5": _combined(tree_digests(list(files.values()), Path())),
            "quality": "passed" if quality["success"] else "failed",
            "quality_result_sha256": file_sha256(RESULT) if RESULT.is_file() else ""}
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, value)
    # before an alias can point at it: the requests whose samples are still in the data keep their adapters
    # quarantined in this version too (a forget's batch is no longer held once its rows are removed)
    adapters, requests = held(project_root())
    quarantine.tag_version(client, name, version, adapters, requests, stamp(now()))
    alias, reason = promote(name, version, result, owner[PROJECT_TAG], dvc_experiment())
    print(f"registered {name} version {version} as @{alias}: {reason}")


def _combined(digests: dict[str, str]) -> str:
    """One digest standing for many files: md5 of the sorted 'path digest' lines."""
    return hashlib.md5("".join(f"{p} {d}\n" for p, d in digests.items()).encode()).hexdigest()


if __name__ == "__main__":
    run_stage(main)
