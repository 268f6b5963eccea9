"""Purge by provenance on MLflow, scoped to the project (issue 21): real `mlflow server`, real builds and forgets.

* Two projects initialised one after the other on one `mlflow server` with the names `init` gives by default, then
  built: they get distinct experiments and registered models, each carrying its project's ID. A forget in one
  deletes its superseded version and logged model (gone from the server's artifact storage too) and leaves the
  other project's versions, champion and logged models whole, and another team's trashed run and experiment
  un-gc'ed. A third project cannot take a name another project owns.
* A forget killed at every step of the MLflow purge (after a version is deleted and before its logged model, before
  gc, after gc) is finished by re-running it: nothing of the superseded versions is left and the record lists them.
* `legonet audit verify` finds a purged logged model's weights put back, and a superseded version kept past its
  `purge.retention_days` date.
* A project made before project IDs is refused by `forget` with the way out, and `legonet adopt` gives it one.

Runtime (2 cores): two builds against the server, four forgets on a copy of the session's project.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import copy_project, init_args, legonet
from conftest import mlflow_server as start_mlflow_server
from test_forget import forget, record, write_manifest

from pipeline.data.dataset import read_table
from pipeline.purge.models import CRASH_POINTS
from pipeline.tracking.identity import PROJECT_TAG


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("shared-mlflow")
    with start_mlflow_server(home, str(home / "artifacts")) as running:
        yield {**running, "artifacts": str(home / "artifacts")}


def params_of(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "params.yaml").read_text())


def train_ids(root: Path) -> list[str]:
    return sorted(read_table(root / "data/routing.parquet")["sample_id"])


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, server: dict[str, str]) -> dict[str, Any]:
    """Projects A and B on one server (default names), both initialised before either builds; another team's
    trashed run and experiment; then a forget in A. The state of B and the team's trash before and after."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("shared")
    roots = {name: work / name for name in ("a", "b")}
    overrides = {"mlflow.tracking_uri": server["uri"], "mlflow.backend_store_uri": server["backend"]}
    for root in roots.values():
        root.mkdir()
        legonet(*init_args(tiny_data, overrides), cwd=root)
    for root in roots.values():
        legonet("build", cwd=root)
    client = MlflowClient(server["uri"])
    team = client.create_experiment("team-experiments")
    run = client.create_run(team).info.run_id
    client.delete_run(run)
    old = client.create_experiment("team-old")
    client.delete_experiment(old)
    a, b = (params_of(roots[n])["mlflow"]["registered_model"] for n in ("a", "b"))
    before = {"b": b_state(client, b), "a": client.get_model_version(a, "1")}
    manifest = write_manifest(work / "req-a.json", "req-a", train_ids(roots["a"])[:1])
    summary = forget(roots["a"], manifest)
    return {"roots": roots, "client": client, "team": {"run": run, "experiment": old}, "before": before,
            "summary": summary, "record": record(roots["a"], "req-a")}


def b_state(client: Any, name: str) -> dict[str, Any]:
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    models = [client.get_logged_model(v.source.split("/")[1]) for v in versions]
    return {"versions": [(str(v.version), v.source) for v in versions],
            "champion": str(client.get_model_version_by_alias(name, "champion").version),
            "models": [(m.model_id, m.artifact_location) for m in models]}


def artifact_files(server: dict[str, str], model_id: str) -> list[Path]:
    return [p for p in Path(server["artifacts"]).rglob("*") if p.is_file() and f"/models/{model_id}/" in str(p)]


def test_default_names_do_not_collide_and_carry_the_project_id(shared: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client: MlflowClient = shared["client"]
    a, b = (params_of(shared["roots"][n]) for n in ("a", "b"))
    assert a["project"]["id"] != b["project"]["id"]
    assert a["mlflow"]["registered_model"] == a["mlflow"]["experiment"] == "legonet"  # free when A was made
    taken = f"legonet-{b['project']['id'][:8]}"
    assert b["mlflow"]["registered_model"] == b["mlflow"]["experiment"] == taken
    for params in (a, b):
        pid, name = params["project"]["id"], params["mlflow"]["registered_model"]
        experiment = client.get_experiment_by_name(params["mlflow"]["experiment"])
        assert experiment.tags[PROJECT_TAG] == pid and client.get_registered_model(name).tags[PROJECT_TAG] == pid
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        assert runs and {r.data.tags.get(PROJECT_TAG) for r in runs} == {pid}
        for version in client.search_model_versions(f"name='{name}'"):
            version = client.get_model_version(name, version.version)
            assert version.tags[PROJECT_TAG] == pid and version.tags["project"] == pid  # never a path
            assert client.get_logged_model(version.source.split("/")[1]).tags[PROJECT_TAG] == pid


def test_a_forget_in_one_project_leaves_the_other_and_other_teams_whole(shared: dict[str, Any],
                                                                        server: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client: MlflowClient = shared["client"]
    a = params_of(shared["roots"]["a"])["mlflow"]["registered_model"]
    b = params_of(shared["roots"]["b"])["mlflow"]["registered_model"]
    assert b_state(client, b) == shared["before"]["b"]  # versions, champion, logged models
    assert all(artifact_files(server, model_id) for model_id, _ in shared["before"]["b"]["models"])
    assert client.get_run(shared["team"]["run"]).info.lifecycle_stage == "deleted"  # trashed, not gc'ed
    assert client.get_experiment(shared["team"]["experiment"]).lifecycle_stage == "deleted"
    gone = shared["before"]["a"].source.split("/")[1]
    assert [str(v.version) for v in client.search_model_versions(f"name='{a}'")] == ["2"]
    assert str(client.get_model_version_by_alias(a, "champion").version) == "2"
    assert artifact_files(server, gone) == []  # the server's artifact storage no longer holds its weights
    purged = shared["record"]["purge"]["mlflow"]
    assert purged["deleted_model_versions"] == ["1"] and purged["deleted_logged_models"] == [gone]
    assert purged["project_id"] == params_of(shared["roots"]["a"])["project"]["id"]
    legonet("audit", "verify", cwd=shared["roots"]["a"])


def test_init_refuses_a_name_another_project_owns(shared: dict[str, Any], tiny_data: Path, server: dict[str, str],
                                                  tmp_path: Path) -> None:
    owned = params_of(shared["roots"]["b"])["mlflow"]["registered_model"]
    overrides = {"mlflow.tracking_uri": server["uri"], "mlflow.registered_model": owned}
    result = legonet(*init_args(tiny_data, overrides), cwd=tmp_path, check=False)
    assert result.returncode == 4, result.stderr
    assert f"registered model '{owned}'" in result.stderr and "--set mlflow.registered_model=NAME" in result.stderr
    assert not (tmp_path / "params.yaml").exists()  # nothing written


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory, built_project: Path) -> dict[str, Any]:
    """A copy of the session's project; one forget per MLflow purge step, each killed there and then re-run."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("crashed")
    root = copy_project(built_project, work / "project")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids, steps = train_ids(root), {}
    for i, point in enumerate(CRASH_POINTS):
        superseded = client.get_model_version("legonet", str(i + 1))
        manifest = write_manifest(work / f"req-{i}.json", f"req-{i}", [ids[i * 7]])
        killed = legonet("forget", str(manifest), cwd=root, env={"LEGONET_CRASH_AFTER": point}, check=False)
        journal = json.loads((root / ".legonet/journal.json").read_text())
        rerun = forget(root, manifest)
        steps[point] = {"killed": killed, "journal": journal, "rerun": rerun, "superseded": superseded,
                        "record": record(root, f"req-{i}")}
    return {"root": root, "client": client, "steps": steps, "work": work}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_every_mlflow_purge_step_is_finished_by_a_rerun(crashed: dict[str, Any], point: str) -> None:
    from mlflow.exceptions import MlflowException

    step, client, root = crashed["steps"][point], crashed["client"], crashed["root"]
    assert step["killed"].returncode == -9, step["killed"].stderr[-2000:]
    assert step["journal"]["state"] == "registered"  # the purge step was under way ...
    superseded = step["superseded"]
    model_id = superseded.source.split("/")[1]
    planned = step["journal"]["results"]["mlflow_plan"]["delete"]  # ... with every object named before
    assert [(i["version"], i["model_id"]) for i in planned] == [(str(superseded.version), model_id)]
    assert step["rerun"]["status"] == "forgotten" and not (root / ".legonet/journal.json").exists()
    for gone in ((client.get_model_version, "legonet", str(superseded.version)), (client.get_logged_model, model_id)):
        with pytest.raises(MlflowException) as error:
            gone[0](*gone[1:])
        assert error.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert not (root / "mlartifacts" / "models" / model_id).exists()
    purged = step["record"]["purge"]["mlflow"]
    assert purged["deleted_model_versions"] == [str(superseded.version)]
    assert purged["deleted_logged_models"] == [model_id]


def test_after_the_crashes_verify_passes_and_finds_a_version_kept_past_its_retention(crashed: dict[str, Any]
                                                                                       ) -> None:
    root, client = crashed["root"], crashed["client"]
    assert [str(v.version) for v in client.search_model_versions("name='legonet'")] == [str(len(CRASH_POINTS) + 1)]
    legonet("audit", "verify", cwd=root)
    purged = crashed["steps"][CRASH_POINTS[0]]["record"]["purge"]["mlflow"]["deleted_logged_models"][0]
    restored = root / "mlartifacts" / "models" / purged / "artifacts"
    restored.mkdir(parents=True)  # its weights put back, e.g. from a backup
    (restored / "model.pkl").write_bytes(b"weights")
    result = legonet("audit", "verify", cwd=root, check=False)
    assert result.returncode == 9 and f"logged model {purged}, purged by request req-0, still exists" in result.stderr
    shutil.rmtree(restored.parent)
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("retention_days: 0", "retention_days: 30"))
    subprocess.run(["git", "commit", "-qam", "keep superseded versions 30 days"], cwd=root, check=True)
    manifest = write_manifest(crashed["work"] / "req-kept.json", "req-kept", [train_ids(root)[3]])
    forget(root, manifest)
    kept = str(len(CRASH_POINTS) + 1)
    assert record(root, "req-kept")["purge"]["mlflow"]["retained_model_versions"].keys() == {kept}
    legonet("audit", "verify", cwd=root)  # kept by purge.retention_days: not residue yet
    client.set_model_version_tag("legonet", kept, "legonet.purge_after", "2000-01-01")
    result = legonet("audit", "verify", cwd=root, check=False)
    assert result.returncode == 9
    assert f"model version {kept} of 'legonet' was trained before the last forget's version" in result.stderr
    assert "kept until 2000-01-01, now past" in result.stderr


def test_a_project_made_before_ids_is_refused_until_adopted(built_project: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    root = copy_project(built_project, tmp_path / "legacy")
    params = (root / "params.yaml").read_text()
    pid = params_of(root)["project"]["id"]
    (root / "params.yaml").write_text(params.replace(f'id: "{pid}"', 'id: ""'))
    subprocess.run(["git", "commit", "-qam", "as a project made before IDs"], cwd=root, check=True)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("legonet")
    client.delete_experiment_tag(experiment.experiment_id, PROJECT_TAG)
    client.delete_registered_model_tag("legonet", PROJECT_TAG)
    version = client.get_model_version("legonet", "1")
    client.delete_model_version_tag("legonet", "1", PROJECT_TAG)
    client.delete_logged_model_tag(version.source.split("/")[1], PROJECT_TAG)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    for run in runs:
        client.delete_tag(run.info.run_id, PROJECT_TAG)
    manifest = write_manifest(tmp_path / "req.json", "req-legacy", train_ids(root)[:1])
    refused = legonet("forget", str(manifest), cwd=root, check=False)
    assert refused.returncode == 4 and "legonet adopt" in refused.stderr
    assert not (root / ".legonet/journal.json").exists()
    adopted = legonet("adopt", cwd=root)
    assert f"{len(runs)} run(s)" in adopted.stdout and "1 version(s)" in adopted.stdout
    new = params_of(root)["project"]["id"]
    assert len(new) == 32 and new != pid
    assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=root, capture_output=True,
                          text=True).stdout == ""  # committed
    assert client.get_experiment(experiment.experiment_id).tags[PROJECT_TAG] == new
    assert client.get_registered_model("legonet").tags[PROJECT_TAG] == new
    assert client.get_model_version("legonet", "1").tags[PROJECT_TAG] == new
    assert client.get_logged_model(version.source.split("/")[1]).tags[PROJECT_TAG] == new
    assert {r.data.tags.get(PROJECT_TAG) for r in client.search_runs([experiment.experiment_id])} == {new}
