"""A user's own data, as users have it (issue 13): a table of numbers with named classes, through the real CLI
(git + DVC + MLflow SQLite + ONNX Runtime + torch; no mocks).

One project on sklearn's wine table (178 rows, 13 numeric columns, three cultivars named, not numbered) is
initialised with the data alone (every other choice derived from it), built, and asked to forget two samples; a
second project initialised on the retained rows is built from scratch meanwhile (the exactness oracle). Checked:
the gate makes the first build champion and the forget keeps it; git holds the project after every command and a
clone rebuilds it with `dvc repro` doing nothing; MLmodel names no temporary folder; predictions, metrics, Data
Docs and `mlflow models serve` answer in class names; the forget equals the fresh build bit for bit.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import legonet
from test_forget import artifacts_md5, lock_without_package_listing
from test_serving import _free_port, _wait_for_ping

import pipeline
from pipeline.data.dataset import read_table
from pipeline.data.quality import QualityParams, held_out_features, norm_bounds, norm_range, read_norm_bounds
from pipeline.data.salt import secret_path
from pipeline.errors import DataError
from pipeline.model.keys import fit_projection, project
from pipeline.project.init import KEYS_PER_REFERENCE, ROWS_PER_PARTITION, defaults_from_data
from pipeline.tracking.registry import Replaced, gate

CULTIVARS = ("barolo", "grignolino", "barbera")  # the wine table's three classes, by name
PROJECT_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", ".gitignore", ".dvcignore", ".dvc/config",
                 "metrics/evaluate.json", "metrics/baseline.json")
FAST = ("--set", "data.partitions=2")  # fewer encode stages; every other param is derived from the data


def wine_table() -> pd.DataFrame:
    from sklearn.datasets import load_wine

    wine = load_wine(as_frame=True)
    frame = wine.frame.drop(columns=["target"])
    frame.insert(0, "label", [CULTIVARS[i] for i in wine.target])
    frame.insert(0, "sample_id", [f"wine-{i:03d}" for i in range(len(frame))])
    return frame


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def dvc(root: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("wine")
    root, scratch = work / "project", work / "scratch"
    table = wine_table()
    table.to_csv(data := work / "wine.csv", index=False)
    out: dict[str, Any] = {"root": root, "scratch": scratch, "work": work, "status": {}}
    out["init"] = legonet("init", str(root), "--data", str(data), *FAST, cwd=work)
    out["status"]["init"] = git(root, "status", "--porcelain")
    out["build"] = legonet("build", cwd=root)
    out["status"]["build"] = git(root, "status", "--porcelain")
    out["head_after_build"] = git(root, "ls-tree", "-r", "--name-only", "HEAD").split()

    # forget one train sample and one test sample the model gets wrong (a forget that keeps accuracy: the gate
    # judges it against the version it replaces); a fresh project on the retained rows is the oracle
    train_id = sorted(read_table(root / "data/routing.parquet")["sample_id"])[0]
    scored = pd.read_csv(io.StringIO(legonet("predict", "data/test/test.parquet", cwd=root).stdout))
    truth = read_table(root / "data/test/test.parquet").set_index("sample_id")["label"]
    wrong = sorted(scored["sample_id"][scored["prediction"].to_numpy() != truth[scored["sample_id"]].to_numpy()])
    test_id = (wrong or sorted(truth.index))[0]
    out["forgotten"] = {train_id, test_id}
    table[~table["sample_id"].isin(out["forgotten"])].to_csv(retained := work / "retained.csv", index=False)
    errors: list[BaseException] = []

    def build_scratch() -> None:
        try:
            legonet("init", str(scratch), "--data", str(retained), "--data-secret", str(secret_path(root)), *FAST,
                    cwd=work)
            legonet("build", cwd=scratch)
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    builder = threading.Thread(target=build_scratch)
    builder.start()
    manifest = work / "forget.json"
    manifest.write_text(json.dumps({"request_id": "req-wine-1", "sample_ids": sorted(out["forgotten"]),
                                    "reason": "GDPR Art. 17", "received_at": "2026-11-30T09:00:00Z"}))
    out["forget"] = json.loads(legonet("forget", str(manifest), cwd=root).stdout.strip().splitlines()[-1])
    out["status"]["forget"] = git(root, "status", "--porcelain")
    builder.join()
    if errors:
        raise errors[0]
    return out


def test_gate_judges_a_build_against_the_version_it_replaces() -> None:
    unset = {"min_accuracy": None, "max_drop": 0.01}
    first = gate(0.65, None, unset)
    assert first.passed and "first version" in first.reason
    assert not gate(0.65, None, {**unset, "min_accuracy": 0.9}).passed  # a floor only when the user sets one
    assert gate(0.935, Replaced("3", 0.94), unset).passed
    held = gate(0.92, Replaced("3", 0.94), unset)
    assert not held.passed and "version 3" in held.reason and "0.0200" in held.reason
    assert not gate(0.99, None, unset, ["quality checkpoint failed: adapters"]).passed


@pytest.mark.parametrize(("samples", "n"), [(178, 4), (1797, 4), (3000, 8), (5000, 16), (70000, 128)])
def test_adapters_n_leaves_each_adapter_about_600_rows(samples: int, n: int) -> None:
    params = {"adapters": {"n": 32, "k": 3},
              "data": {"reference_fraction": 0.1, "test_fraction": 0.2, "partitions": 4}}
    chosen = {key: value for key, value, _ in defaults_from_data(params, {"data": samples}, set())}
    assert chosen["adapters.n"] == n
    assert chosen.get("data.reference_fraction", 0.1) * samples >= KEYS_PER_REFERENCE * n
    kept = defaults_from_data(params, {"data": samples}, {"adapters.n"})  # --set wins
    assert all(key != "adapters.n" for key, _, _ in kept)


@pytest.mark.parametrize(("samples", "partitions"), [(5000, 4), (23000, 4), (70000, 12), (280000, 48)])
def test_partitions_hold_at_most_rows_per_partition_training_rows(samples: int, partitions: int) -> None:
    params = {"adapters": {"n": 32, "k": 3},
              "data": {"reference_fraction": 0.1, "test_fraction": 0.2, "partitions": 4}}
    chosen = {key: value for key, value, _ in defaults_from_data(params, {"data": samples}, {"adapters.n"})}
    assert chosen.get("data.partitions", 4) == partitions
    assert int(samples * 0.7) <= partitions * ROWS_PER_PARTITION
    kept = defaults_from_data(params, {"data": samples}, {"adapters.n", "data.partitions"})  # --set wins
    assert all(key != "data.partitions" for key, _, _ in kept)


def test_standardising_is_folded_into_the_projection() -> None:
    rng = np.random.default_rng(0)
    # columns in unrelated units (float32, as the encoder gives them): standardised, none dominates the distances
    table = (rng.normal(size=(200, 3)) * np.array([1e-2, 1.0, 1e4]) + np.array([0.5, -2.0, 1e5])).astype(np.float32)
    identity = project(table, fit_projection(table, 0, standardise=True))
    expected = (table.astype(np.float64) - table.mean(0, dtype=np.float64)) / table.std(0, dtype=np.float64)
    np.testing.assert_allclose(identity, expected, atol=1e-3)
    pca = project(table, fit_projection(table, 2, standardise=True))
    assert pca.shape == (200, 2) and 0.7 < pca.std(0).min() <= pca.std(0).max() < 1.3


def test_the_norm_rule_asks_what_the_reference_split_can_promise() -> None:
    """Beyond the [min, max] of m reference norms lies 2 / (m + 1) of clean data; doubled, that is the tolerance."""
    rule = QualityParams(1, 1, 1.0, 1, 0.5, 0.99)
    assert rule.for_reference(16).norm_mostly == pytest.approx(1 - 4 / 17, abs=1e-4)  # the wine table's split
    assert rule.for_reference(7000).norm_mostly == 0.99  # a large split keeps the configured share
    rng = np.random.default_rng(1)  # and on clean data it holds: heavy-tailed norms, 16 reference samples
    held = [np.mean((x >= r.min()) & (x <= r.max())) >= rule.for_reference(16).norm_mostly
            for r, x in ((rng.lognormal(size=16), rng.lognormal(size=400)) for _ in range(200))]
    assert np.mean(held) > 0.9


def test_the_norm_range_is_learned_out_of_sample() -> None:
    """A PCA fitted on 300 reference samples keeps more of their variance than of new samples' (MiniLM-like: unit
    vectors in 384 dimensions): a range from their projected norms rejects clean data; a cross-fitted one does not."""
    rng = np.random.default_rng(2)
    unit = rng.normal(size=(2300, 384)) + 0.5 * rng.normal(size=(1, 384))
    unit = (unit / np.linalg.norm(unit, axis=1, keepdims=True)).astype(np.float32)
    reference, train = unit[:300], unit[300:]
    projection = fit_projection(reference, 128)
    norms = np.linalg.norm(project(train, projection), axis=1)

    def share_inside(features: np.ndarray) -> float:
        low, high = norm_range(norm_bounds(features), 0.5)
        return float(np.mean((norms >= low) & (norms <= high)))

    assert share_inside(project(reference, projection)) < 0.9
    assert share_inside(held_out_features(reference, projection)) >= 0.99


def test_the_norm_rule_read_from_the_keys_stage_file_is_the_one_computed(tmp_path: Path) -> None:
    """The `keys` stage stores the reference norms as JSON (off the forget path); read back, they give the very
    range computed from the features (floats round-trip exactly), and a missing or foreign file is named."""
    features = np.random.default_rng(3).lognormal(size=(500, 16)).astype(np.float32)
    path = tmp_path / "reference_norms.json"
    path.write_text(json.dumps(norm_bounds(features), indent=1, sort_keys=True) + "\n")
    assert norm_range(read_norm_bounds(path), 0.5) == norm_range(norm_bounds(features), 0.5)
    assert read_norm_bounds(path)["samples"] == 500
    with pytest.raises(DataError, match=r"missing\.json: missing; run `dvc repro`"):
        read_norm_bounds(tmp_path / "missing.json")
    path.write_text('{"min": 1}')
    with pytest.raises(DataError, match=r"reference_norms\.json: expected the keys samples, min, max"):
        read_norm_bounds(path)
    for broken in ('{"samples": 5, "min": "x", "max": 2}', '{"samples": 5, "min": 3, "max": 2}',
                   '{"samples": -1, "min": 1, "max": 2}', '{"samples": 5, "min": 1, "max": NaN}'):
        path.write_text(broken)
        with pytest.raises(DataError, match=r"reference_norms\.json: samples must be a count and min <= max"):
            read_norm_bounds(path)


def test_init_derives_the_params_from_the_data_and_says_why(wine: dict[str, Any]) -> None:
    params = yaml.safe_load((wine["root"] / "params.yaml").read_text())
    assert params["data"]["modality"] == "table" and params["encoder"]["name"] == "none"
    assert params["data"]["features"] == [c for c in wine_table().columns if c not in ("sample_id", "label")]
    assert params["data"]["classes"] == sorted(CULTIVARS)  # names, in a fixed (sorted) order
    assert params["gate"]["min_accuracy"] is None
    said = " ".join(wine["init"].stderr.split())
    assert f"chose adapters.n: {params['adapters']['n']}" in said and "rows per adapter" in said


def test_first_build_is_champion_and_a_forget_keeps_it(wine: dict[str, Any]) -> None:
    built = wine["build"].stdout
    assert "[champion]" in built and "first version: nothing to compare against" in built, built
    assert "champion" in wine["forget"]["aliases"], wine["forget"]
    assert "the version it replaces" in wine["forget"]["gate_reason"]


def test_git_holds_the_project_and_a_clone_rebuilds_nothing(wine: dict[str, Any], tmp_path: Path) -> None:
    root = wine["root"]
    assert wine["status"] == {"init": "", "build": "", "forget": ""}, wine["status"]
    assert set(PROJECT_FILES) <= set(wine["head_after_build"])
    assert any(p.endswith(".dvc") and p.startswith("data/raw/") for p in wine["head_after_build"])
    head = git(root, "ls-tree", "-r", "--name-only", "HEAD").split()
    assert set(PROJECT_FILES) <= set(head) and any(p.startswith("audit/records/") for p in head)
    assert git(root, "log", "-1", "--format=%s").startswith("legonet forget req-wine-1")
    assert not [p for p in head if p.endswith((".parquet", ".npy", ".safetensors", ".onnx", ".db"))]
    config = (root / ".dvc/config").read_text()
    assert "analytics = false" in config and "check_update = false" in config

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    dvc(clone, "cache", "dir", "--local", str(root / ".dvc/cache"))
    dvc(clone, "checkout", "-q")
    assert "Data and pipelines are up to date" in dvc(clone, "status")
    repro = dvc(clone, "repro")
    assert "Running stage" not in repro, repro
    assert artifacts_md5(clone) == artifacts_md5(root)


def test_mlmodel_names_no_temporary_folder(wine: dict[str, Any]) -> None:
    text = (wine["root"] / "models/package/MLmodel").read_text()
    doc = yaml.safe_load(text)
    uris = {name: a["uri"] for name, a in doc["flavors"]["python_function"]["artifacts"].items()}
    assert uris["keys"] == "artifacts/keys.npy" and uris["config"] == "artifacts/config.json", uris
    # MLflow records the model code's source as an absolute path (it loads only its name): the installed served.py,
    # which may itself sit under /tmp (a checkout there); no other path may name a temporary folder
    served = doc["flavors"]["python_function"]["model_code_path"]
    assert Path(served) == Path(pipeline.__file__).resolve().parent / "model" / "served.py", served
    rest = text.replace(served, "")
    assert "/tmp" not in rest and str(Path(os.environ.get("TMPDIR", "/tmp"))) not in rest


def test_named_classes_in_predictions_metrics_data_docs_and_serving(wine: dict[str, Any], tmp_path: Path) -> None:
    root = wine["root"]
    per_class = pd.read_csv(root / "metrics/per_class.csv")
    assert per_class["label"].tolist() == sorted(CULTIVARS)
    docs = " ".join(p.read_text(errors="ignore") for p in (root / "reports/quality/data_docs").rglob("*.html"))
    assert all(name in docs for name in CULTIVARS)

    test = read_table(root / "data/test/test.parquet").groupby("label").head(1).reset_index(drop=True)
    test.to_csv(queries := tmp_path / "queries.csv", index=False)
    predicted = pd.read_csv(io.StringIO(legonet("predict", str(queries), cwd=root).stdout))
    assert set(predicted["prediction"]) <= set(CULTIVARS)
    assert [f"proba_{c}" for c in sorted(CULTIVARS)] == [c for c in predicted.columns if c.startswith("proba_")]
    assert (predicted["prediction"] == test["label"]).mean() >= 2 / 3  # three well-separated cultivars

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/legonet@champion",
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
    with open(log := tmp_path / "serve.log", "w") as sink:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_for_ping(port, server, log)
        features = yaml.safe_load((root / "params.yaml").read_text())["data"]["features"]
        body = json.dumps({"dataframe_split": {"columns": features,
                                               "data": test[features].to_numpy().tolist()}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = pd.DataFrame(json.loads(response.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert served["prediction"].tolist() == predicted["prediction"].tolist()


def test_tabular_forget_equals_a_fresh_build_on_the_retained_rows(wine: dict[str, Any]) -> None:
    forgot, scratch = artifacts_md5(wine["root"]), artifacts_md5(wine["scratch"])
    assert sorted(forgot) == sorted(scratch) and any(p.startswith("models/adapters/") for p in forgot)
    differ = sorted(p for p in forgot if forgot[p] != scratch[p])
    assert not differ, f"artifacts differ from the fresh build on the retained rows: {differ}"
    assert lock_without_package_listing(wine["root"]) == lock_without_package_listing(wine["scratch"])
    routed = set(read_table(wine["root"] / "data/routing.parquet")["sample_id"])
    assert not routed & wine["forgotten"]


def test_a_column_that_is_not_a_number_is_refused_and_nothing_written(tmp_path: Path) -> None:
    table = wine_table()
    table["hue"] = table["hue"].astype(object)
    table.loc[5, "hue"] = "dark"
    table.to_csv(data := tmp_path / "bad.csv", index=False)
    (project := tmp_path / "project").mkdir()
    result = legonet("init", str(project), "--data", str(data), cwd=tmp_path, check=False)
    message = " ".join(result.stderr.split())
    assert result.returncode == 3 and "'hue'" in message and "wine-005" in message and "--features" in message
    assert list(project.iterdir()) == []
    # choosing the numeric columns with --features makes the same file a valid table
    legonet("init", str(project), "--data", str(data), "--features", "alcohol,proline,magnesium", cwd=tmp_path)
    assert yaml.safe_load((project / "params.yaml").read_text())["data"]["features"] == [
        "alcohol", "proline", "magnesium"]


def test_no_tool_may_report_usage() -> None:
    """Every legonet process turns MLflow's, GX's and DVC's telemetry off, even where the user's shell enables it
    (CI markers removed: MLflow itself stays quiet under CI)."""
    code = ("import pipeline, os; from mlflow.telemetry.utils import is_telemetry_disabled; "
            "print(is_telemetry_disabled(), os.environ['GX_ANALYTICS_ENABLED'], os.environ['DVC_NO_ANALYTICS'])")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS")}
    env.update({"MLFLOW_DISABLE_TELEMETRY": "false", "DO_NOT_TRACK": "false", "GX_ANALYTICS_ENABLED": "true"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "false", "1"], out
