"""executor: ray, for real (a local Ray with the machine's 2 CPUs, a real `mlflow server` on 127.0.0.1; no mocks).

Issue 7's acceptance points:

* a small build and a forget with ``executor: ray`` leave every artifact digest, ``dvc.lock`` and the audit
  record's digests equal to the ``local`` run's (the session's ``built_project`` and a clone of it);
* the lineage of a Ray-executed build reaches an ``mlflow server`` (SQLite backend, proxied artifacts), with
  every Ray task's run nested under its stage's run;
* with Ray missing, ``executor: ray`` fails with the install hint (exercised without Ray by faking its absence).

Runtime (2 cores): one Ray build (~100 s: a local Ray start ~10 s, plus per-stage Ray workers), then one forget
on it and one local forget on a clone of ``built_project``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY, copy_project, init_args, legonet
from conftest import mlflow_server as start_mlflow_server
from test_forget import artifacts_md5, forget, lock_without_package_listing, record, write_manifest
from test_pipeline import ALL_STAGES, digests, mlmodel_without_volatile

from pipeline.data.dataset import read_table
from pipeline.data.salt import secret_path
from pipeline.tracking.lineage import file_md5

pytest.importorskip("ray", reason="executor: ray needs the optional extra: pip install -e '.[test,ray]'")

ADAPTERS = int(TINY["adapters.n"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts on the local disk."""
    home = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(home, str(home / "artifacts")) as server:
        yield server


@pytest.fixture(scope="module")
def ray_build(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, mlflow_server: dict[str, str],
              built_project: Path) -> dict[str, Any]:
    """The tiny project with `executor: ray`, lineage to the server, built once; its state right after the build."""
    root = tmp_path_factory.mktemp("ray") / "project"
    root.mkdir()
    overrides = {"executor": "ray", "ray.encode_chunk": 128, "mlflow.tracking_uri": mlflow_server["uri"],
                 "mlflow.backend_store_uri": mlflow_server["backend"]}
    # the local build's data secret: the two builds are compared byte for byte
    legonet(*init_args(tiny_data, overrides), "--data-secret", str(secret_path(built_project)), cwd=root)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # legonet starts its own local Ray
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli.main", "build"], cwd=root, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, f"ray build failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return {"root": root, "seconds": time.monotonic() - started, "stdout": result.stdout,
            "digests": digests(root, "data", "models", "metrics"),
            "lock": lock_without_package_listing(root),
            "MLmodel": mlmodel_without_volatile(root / "models/package/MLmodel")}


def test_ray_build_equals_the_local_build(ray_build: dict[str, Any], built_project: Path) -> None:
    """Every file under data/, models/, metrics/ has the local build's bytes (MLmodel: up to MLflow's uuid, time
    and staging paths, as between two local builds); dvc.lock is equal but for the package listing's hash."""
    local, ray = digests(built_project, "data", "models", "metrics"), ray_build["digests"]
    assert local.keys() == ray.keys(), sorted(local.keys() ^ ray.keys())
    assert sorted(p for p in local if local[p] != ray[p]) == ["models/package/MLmodel"]
    assert mlmodel_without_volatile(built_project / "models/package/MLmodel") == ray_build["MLmodel"]
    assert lock_without_package_listing(built_project) == ray_build["lock"]
    assert set(ray_build["lock"]["stages"]) == ALL_STAGES
    assert "executor" not in json.dumps(ray_build["lock"]), "no stage may declare the executor param"


def test_ray_lineage_reaches_the_mlflow_server_nested_under_stage_runs(ray_build: dict[str, Any],
                                                                       mlflow_server: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server["uri"])
    (experiment,) = [e for e in client.search_experiments() if e.name == "legonet"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    stages = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    tasks = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert set(stages) == ALL_STAGES
    assert all(stages[s].data.tags["legonet.executor"] == "ray" for s in stages if s.startswith(("encode@", "train@")))
    by_id = {r.info.run_id: r.info.run_name for r in stages.values()}
    parents = {r.info.run_name: by_id[r.data.tags["mlflow.parentRunId"]] for r in tasks}
    assert all(task.startswith(f"{parent}/") for task, parent in parents.items()), parents
    trained = {r.data.tags["legonet.task"]: r for r in tasks if r.info.run_name.startswith("train@")}
    assert sorted(trained) == [f"adapter-{j:04d}" for j in range(ADAPTERS)]  # a full build trains every adapter
    root = ray_build["root"]
    for name, run in trained.items():  # each task run names the weights it produced, by DVC's md5
        (out,) = [(k, v) for k, v in run.data.tags.items() if k.startswith("out.")]
        assert out[0].endswith(f"{name}.safetensors") and out[1] == file_md5(root / out[0][4:])
        assert run.data.tags.get("ray.node_id") and run.data.metrics["train_samples"] > 0
    for part in ("part-0000", "part-0001", "reference", "test"):
        chunks = [r for r in tasks if r.info.run_name.startswith(f"encode@{part}/chunk-")]
        assert chunks and sum(r.data.metrics["samples"] for r in chunks) == stages[f"encode@{part}"].data.metrics[
            "samples"]
    versions = client.search_model_versions("name='legonet'")
    assert [v.version for v in versions] == ["1"]  # the package stage registered through the server


def test_a_ray_forget_equals_the_local_forget(ray_build: dict[str, Any], built_project: Path, tmp_path: Path
                                              ) -> None:
    """The same request on the Ray project and on a clone of the local one: same artifacts, dvc.lock, retrained
    adapters and audit digests (the record's MLflow ids, times and the HMACs under each project's key differ)."""
    local = copy_project(built_project, tmp_path / "local")
    ray_root = ray_build["root"]
    train = sorted(read_table(local / "data/routing.parquet")["sample_id"])
    test = sorted(read_table(local / "data/test/test.parquet")["sample_id"])
    manifest = write_manifest(tmp_path / "req-ray.json", "req-ray", [train[0], train[len(train) // 2], test[0]])
    env = {"RAY_ADDRESS": ""}  # legonet starts its own local Ray
    summaries = {name: forget(root, manifest, env=env) for name, root in (("local", local), ("ray", ray_root))}
    assert summaries["local"]["retrained_adapters"] == summaries["ray"]["retrained_adapters"]
    assert summaries["ray"]["retrained_adapters"], "the request must retrain something"

    ours, theirs = artifacts_md5(local), artifacts_md5(ray_root)
    assert ours == theirs, sorted(p for p in ours.keys() | theirs.keys() if ours.get(p) != theirs.get(p))
    assert lock_without_package_listing(local) == lock_without_package_listing(ray_root)

    def digests_of(root: Path) -> dict[str, Any]:
        predicate = record(root, "req-ray")
        # The package folder's listing hash and MLmodel (MLflow's uuid, save time, staging paths) differ between
        # any two builds; MLmodel is compared below up to those fields.
        artifacts = {p: v for p, v in predicate["artifacts"].items()
                     if p not in ("models/package", "models/package/MLmodel")}
        return {"artifacts": artifacts, "adapter_files": predicate["adapter_files"],
                "affected": predicate["affected"], "params": predicate["params_sha256"],
                "stages": sorted(predicate["stages_run"]), "checks": predicate["checks"]}

    assert digests_of(local) == digests_of(ray_root)
    assert (mlmodel_without_volatile(local / "models/package/MLmodel")
            == mlmodel_without_volatile(ray_root / "models/package/MLmodel"))
    params = yaml.safe_load((ray_root / "params.yaml").read_text())
    assert params["executor"] == "ray"
    legonet("audit", "verify", cwd=ray_root)


def test_executor_ray_without_ray_says_how_to_install(built_project: Path, tmp_path: Path) -> None:
    """A Python where `import ray` fails: `legonet build` exits 4 (params) with the install hint."""
    root = copy_project(built_project, tmp_path / "noray")
    text = (root / "params.yaml").read_text().replace("executor: local", "executor: ray", 1)
    (root / "params.yaml").write_text(text)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('no ray here')\n")
    pythonpath = os.pathsep.join([str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = legonet("build", cwd=root, check=False, env={"PYTHONPATH": pythonpath, "RAY_ADDRESS": ""})
    assert result.returncode == 4, result.stderr
    assert "pip install '.[ray]'" in result.stderr
