"""Purge must never delete a live model's artifacts, however many logged models the store holds.

`search_logged_models` returns at most 100 models a call (newest first); the purge deletes every model folder
not in the live set, so reading one page deleted the oldest live models once a project had logged more than 100
(e.g. versions kept by `purge.retention_days`). A real SQLite MLflow store, real logged models and folders.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.purge.models import purge_models

LOGGED = 105  # more than one page of search_logged_models


@pytest.fixture()
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real SQLite MLflow store in ``tmp_path``, also the process's tracking URI (as `configure` sets it in a
    project, and as the purge's `mlflow gc` leaves it), reset afterwards."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_more_than_a_page_of_logged_models_all_survive_with_retention(tmp_path: Path, tracking: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    artifacts = tmp_path / "mlartifacts"
    experiment = client.create_experiment("legonet", artifact_location=artifacts.as_uri())
    models = [client.create_logged_model(experiment, name=f"package-{i}").model_id for i in range(LOGGED)]
    for model_id in models:
        folder = artifacts / "models" / model_id / "artifacts"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"weights")
    client.create_registered_model("legonet")
    # the three oldest are registered: two superseded (retained by retention_days), the current one kept
    versions = [client.create_model_version("legonet", f"models:/{m}", model_id=m).version for m in models[:3]]
    result = purge_models(tracking, "legonet", versions[-1], ["req-1"], artifacts / "models",
                          retain_until="2999-01-01")
    assert result["retained_model_versions"] == {v: "2999-01-01" for v in versions[:2]}
    assert result["deleted_model_versions"] == [] and result["removed_after_gc_skipped"] == []
    survivors = sorted(p.name for p in (artifacts / "models").iterdir())
    assert survivors == sorted(models)
    assert all((artifacts / "models" / m / "artifacts" / "model.onnx").is_file() for m in models[:3])


def test_a_purge_leaves_no_bytes_of_the_deleted_versions_in_the_sqlite_store(tmp_path: Path, tracking: str) -> None:
    """Deleted rows are zeroed (SQLite secure_delete), not left in free pages, and the store is not rewritten."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    artifacts = tmp_path / "mlartifacts"
    experiment = client.create_experiment("legonet", artifact_location=artifacts.as_uri())
    client.create_registered_model("legonet")
    markers = [f"trained-on-request-{i}-{'x' * 40}" for i in range(3)]
    versions = []
    for marker in markers:
        model = client.create_logged_model(experiment, name="package", tags={"legonet.marker": marker}).model_id
        versions.append(client.create_model_version("legonet", f"models:/{model}", model_id=model,
                                                    description=marker).version)
    store = tmp_path / "mlflow.db"
    assert all(m.encode() in store.read_bytes() for m in markers)  # the scan can see them
    inode = store.stat().st_ino
    result = purge_models(tracking, "legonet", versions[-1], ["req-1"], artifacts / "models")
    assert result["deleted_model_versions"] == versions[:2]
    data = store.read_bytes()
    assert markers[0].encode() not in data and markers[1].encode() not in data
    assert markers[2].encode() in data  # the kept version
    assert store.stat().st_ino == inode  # deleted in place, not rewritten by VACUUM
