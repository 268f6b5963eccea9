"""The MLflow purge on a real SQLite store: it deletes this project's superseded models and nothing else.

`search_logged_models` returns at most 100 models a call (newest first); a purge that read one page deleted the
oldest live models once a project had logged more than 100 (e.g. versions kept by `purge.retention_days`). On a
store shared with other projects and teams, only objects carrying the project's ID are listed and deleted, and
MLflow's gc is given exactly their IDs: `mlflow gc --logged-model-ids` alone would also hard-delete every trashed
run and experiment of the store. Real logged models, versions and folders; no mocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import IdentityError
from pipeline.purge.models import plan_purge, purge_models
from pipeline.tracking.identity import PROJECT_TAG, claim_experiment, claim_registered_model
from pipeline.tracking.registry import GateResult, promote

LOGGED = 105  # more than one page of search_logged_models
OURS, THEIRS = "a" * 32, "b" * 32


@pytest.fixture()
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real SQLite MLflow store in ``tmp_path``, also the process's tracking URI (as `configure` sets it in a
    project, and as the purge's gc leaves it), reset afterwards."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def project_models(client: Any, artifacts: Path, pid: str, name: str, count: int, registered: int
                   ) -> tuple[list[str], list[str]]:
    """``count`` logged models of project ``pid`` with a weights file each, the last ``registered`` registered in
    ``name`` (as a build does: claimed, then log_model with the project's tag); returns (model ids, versions)."""
    experiment = claim_experiment(client, name, pid, artifacts.as_uri())
    claim_registered_model(client, name, pid)
    models = [client.create_logged_model(experiment, name=f"package-{i}", tags={PROJECT_TAG: pid}).model_id
              for i in range(count)]
    for model_id in models:
        folder = artifacts / "models" / model_id / "artifacts"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"weights")
    versions = [str(client.create_model_version(name, f"models:/{m}", model_id=m, tags={PROJECT_TAG: pid}).version)
                for m in models[count - registered:]]
    return models, versions


def test_more_than_a_page_of_logged_models_all_survive_with_retention(tmp_path: Path, tracking: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    artifacts = tmp_path / "mlartifacts"
    models, versions = project_models(client, artifacts, OURS, "legonet", LOGGED, LOGGED - 2)
    # every version but the newest is superseded and retained; the two oldest models serve no version (an
    # interrupted build or purge left them) and are found only on the second page of search_logged_models
    orphans, registered = models[:2], models[2:]
    plan = plan_purge(tracking, "legonet", OURS, versions[-1], retain_until="2999-01-01")
    assert plan["delete"] == [] and plan["orphan_logged_models"] == sorted(orphans)
    assert plan["retain"] == [{"name": "legonet", "version": v, "until": "2999-01-01"} for v in versions[:-1]]
    result = purge_models(tracking, plan, ["req-1"], artifacts / "models")
    assert result["retained_model_versions"] == {v: "2999-01-01" for v in versions[:-1]}
    assert result["deleted_model_versions"] == [] and result["removed_after_gc_skipped"] == []
    assert result["deleted_logged_models"] == sorted(orphans)
    assert sorted(p.name for p in (artifacts / "models").iterdir()) == sorted(registered)
    assert all((artifacts / "models" / m / "artifacts" / "model.onnx").is_file() for m in registered)
    assert client.get_model_version("legonet", versions[0]).tags["legonet.purge_after"] == "2999-01-01"


def test_a_purge_leaves_no_bytes_of_the_deleted_versions_in_the_sqlite_store(tmp_path: Path, tracking: str) -> None:
    """Deleted rows are zeroed (SQLite secure_delete), not left in free pages, and the store is not rewritten."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    artifacts = tmp_path / "mlartifacts"
    experiment = claim_experiment(client, "legonet", OURS, artifacts.as_uri())
    claim_registered_model(client, "legonet", OURS)
    markers = [f"trained-on-request-{i}-{'x' * 40}" for i in range(3)]
    versions = []
    for marker in markers:
        model = client.create_logged_model(experiment, name="package",
                                           tags={"legonet.marker": marker, PROJECT_TAG: OURS}).model_id
        versions.append(str(client.create_model_version("legonet", f"models:/{model}", model_id=model,
                                                        description=marker, tags={PROJECT_TAG: OURS}).version))
    store = tmp_path / "mlflow.db"
    assert all(m.encode() in store.read_bytes() for m in markers)  # the scan can see them
    inode = store.stat().st_ino
    result = purge_models(tracking, plan_purge(tracking, "legonet", OURS, versions[-1], None), ["req-1"],
                          artifacts / "models")
    assert result["deleted_model_versions"] == versions[:2]
    data = store.read_bytes()
    assert markers[0].encode() not in data and markers[1].encode() not in data
    assert markers[2].encode() in data  # the kept version
    assert store.stat().st_ino == inode  # deleted in place, not rewritten by VACUUM


def test_a_purge_touches_no_other_project_and_no_other_teams_trash(tmp_path: Path, tracking: str) -> None:
    """Two projects and a team's trash in one store: the purge deletes and gc's only its project's superseded
    version and logged model; the other project's versions, champion and weights, and the team's trashed run,
    trashed experiment and trashed logged model, are all still there."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    ours_dir, theirs_dir, team_dir = tmp_path / "ours", tmp_path / "theirs", tmp_path / "team"
    ours, our_versions = project_models(client, ours_dir, OURS, "legonet", 2, 2)
    theirs, their_versions = project_models(client, theirs_dir, THEIRS, "legonet-bbbbbbbb", 2, 2)
    client.set_registered_model_alias("legonet-bbbbbbbb", "champion", their_versions[0])
    team = client.create_experiment("team-trash", artifact_location=team_dir.as_uri())
    run = client.create_run(team).info.run_id
    client.delete_run(run)
    trashed = client.create_experiment("team-old", artifact_location=team_dir.as_uri())
    client.delete_experiment(trashed)
    team_model = client.create_logged_model(team, name="theirs").model_id
    client.delete_logged_model(team_model)

    plan = plan_purge(tracking, "legonet", OURS, our_versions[1], None)
    assert [(i["name"], i["version"], i["model_id"]) for i in plan["delete"]] == [("legonet", "1", ours[0])]
    result = purge_models(tracking, plan, ["req-1"], ours_dir / "models")
    assert result["deleted_logged_models"] == [ours[0]] and result["project_id"] == OURS
    assert not (ours_dir / "models" / ours[0]).exists() and (ours_dir / "models" / ours[1]).is_dir()
    assert sorted(str(v.version) for v in client.search_model_versions("name='legonet-bbbbbbbb'")) == their_versions
    assert str(client.get_model_version_by_alias("legonet-bbbbbbbb", "champion").version) == their_versions[0]
    assert all((theirs_dir / "models" / m / "artifacts" / "model.onnx").is_file() for m in theirs)
    assert client.get_run(run).info.lifecycle_stage == "deleted"  # trashed, not gc'ed
    assert client.get_experiment(trashed).lifecycle_stage == "deleted"
    assert _stored_deleted(tracking, team_model)  # trashed, not gc'ed
    # the other project's registered model refuses this project's registrations and aliases
    with pytest.raises(IdentityError, match=r"legonet-bbbbbbbb.*carries project b{32}.*mlflow.registered_model"):
        claim_registered_model(client, "legonet-bbbbbbbb", OURS)
    with pytest.raises(IdentityError, match=r"carries project b{32}"):
        promote("legonet-bbbbbbbb", their_versions[1], GateResult(True, "test"), OURS)
    assert str(client.get_model_version_by_alias("legonet-bbbbbbbb", "champion").version) == their_versions[0]


def _stored_deleted(tracking: str, model_id: str) -> bool:
    """Whether the store still holds a soft-deleted logged model (the client does not return those)."""
    from mlflow.tracking import _get_store

    return _get_store(tracking).get_logged_model(model_id, allow_deleted=True).model_id == model_id
