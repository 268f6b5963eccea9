"""`legonet serve` and the packaged model as an MLflow citizen, on real processes: a built tiny project, its SQLite
MLflow store, the server as a subprocess on 127.0.0.1 with two workers, and a load generator in a third process
(bench/load.py) at a steady 50 requests/s across a deferred forget (its quarantine), the batch that retrains it
and a version that cannot load."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_project, free_port, legonet, stop_group

from pipeline.data.dataset import read_table
from pipeline.errors import QuarantineUnreadable
from pipeline.tracking.quarantine import TAG as QUARANTINE_TAG
from pipeline.tracking.quarantine import read as read_quarantine

REPO = Path(__file__).resolve().parents[1]
RATE = 50  # requests per second


def _store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def test_quarantine_tag_reader() -> None:
    assert read_quarantine({}, "3") == (frozenset(), None)
    tag = {"adapters": [1, 4], "requests": ["req-1"], "published_at": "2026-12-05T00:00:00+00:00"}
    assert read_quarantine({QUARANTINE_TAG: json.dumps(tag)}, "3") == (frozenset({1, 4}), tag)
    assert read_quarantine({QUARANTINE_TAG: '{"adapters": []}'}, "3") == (frozenset(), {"adapters": []})
    for bad in ("not json", '{"adapters": "1,4"}', '{"adapters": [1, -2]}', '{"adapters": [true]}', "[1, 4]"):
        with pytest.raises(QuarantineUnreadable, match="model version 3"):
            read_quarantine({QUARANTINE_TAG: bad}, "3")


def test_the_package_is_a_good_mlflow_citizen(built_project: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Signature (with the quarantine param) and input example; loads with no warning from Python or MLflow's
    logger; the example predicts to the declared output columns; the version links to the package stage's run."""
    import mlflow

    package = built_project / "models" / "package"
    mlmodel = yaml.safe_load((package / "MLmodel").read_text())
    assert json.loads(mlmodel["signature"]["params"]) == [
        {"name": "quarantine", "type": "long", "default": [], "shape": [-1]}]
    assert "python_model" not in mlmodel["flavors"]["python_function"]  # from code: nothing is unpickled
    assert (package / "input_example.json").is_file() and (package / "serving_input_example.json").is_file()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(str(package))
    assert not caught, [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    example = pd.DataFrame(**json.loads((package / "input_example.json").read_text()))
    out = model.predict(example, params={"quarantine": []})
    assert list(out.columns) == model.metadata.get_output_schema().input_names()
    mlflow.set_tracking_uri(_store(built_project))
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("legonet", "champion")
    assert version.run_id and version.run_id == version.tags["package_run_id"]
    assert client.get_run(version.run_id).data.tags["legonet.stage"] == "package"


def _get(url: str) -> tuple[int, Any, dict[str, str]]:
    """Status, JSON body (None when blank: /ping), headers."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            status, body, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, body, headers = exc.code, exc.read(), dict(exc.headers)
    return status, json.loads(body) if body.strip() else None, headers


def _post(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


def _until(check: Any, seconds: float, what: str) -> float:
    """Poll ``check()`` until true; returns the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.1)
    return time.monotonic() - start


@pytest.fixture()
def served(built_project: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private copy of the built project and `legonet serve --workers 2` on it."""
    root = copy_project(built_project, tmp_path / "project")
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "serve", "--port", str(port),
                                   "--workers", "2", "--no-access-log"], cwd=root, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert server.poll() is None, log.read_text()
            try:
                return _get(f"{url}/ping")[0] == 200
            except OSError:
                return False
        _until(up, 300, f"legonet serve answering /ping:\n{log.read_text()}")
        yield {"root": root, "url": url, "log": log}
    finally:
        stop_group(server)


def test_serve_follows_the_quarantine_and_the_champion_under_load(served: dict[str, Any], tmp_path: Path) -> None:
    import mlflow

    root, url = served["root"], served["url"]
    test = read_table(root / "data/test/test.parquet")
    image = np.frombuffer(test["image"].iloc[0], dtype=np.uint8).astype(int).tolist()
    # MLflow's request formats all give the same answer
    answers = [_post(f"{url}/invocations", body) for body in (
        {"dataframe_split": {"columns": ["image"], "data": [[image]]}},
        {"dataframe_records": [{"image": image}]}, {"instances": [{"image": image}]}, {"inputs": {"image": [image]}})]
    assert all(a == answers[0] for a in answers) and answers[0][0]["adapters"]
    status, before, _ = _get(f"{url}/version")
    assert status == 200 and before["version"] == "1" and before["quarantine"] == {"adapters": [], "tag": None}

    body, stop, results = tmp_path / "body.json", tmp_path / "stop", tmp_path / "load.json"
    body.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image]]}}))
    load = subprocess.Popen([sys.executable, "-m", "bench.load", "--url", f"{url}/invocations", "--body", str(body),
                             "--rate", str(RATE), "--concurrency", "16", "--duration", "600", "--stop-file", str(stop),
                             "--out", str(results)], cwd=REPO, start_new_session=True)  # -m: bench from REPO
    try:
        time.sleep(2)
        # a train sample that shares an adapter with the probe image: its quarantine must change the probe's answer
        probe = {int(a) for a in answers[0][0]["adapters"].split()}
        routing = read_table(root / "data/routing.parquet")
        forgotten, affected = next((s, {int(j) for j in a}) for s, a in zip(routing["sample_id"], routing["adapters"],
                                                                           strict=True) if probe & {int(j) for j in a})
        manifest = tmp_path / "req-serve.json"
        manifest.write_text(json.dumps({"request_id": "req-serve", "sample_ids": [forgotten], "reason": "test",
                                        "received_at": datetime.now(UTC).isoformat(timespec="seconds")}))
        deferred_at = datetime.now(UTC)
        legonet("forget", "--defer", str(manifest), cwd=root)
        published = time.monotonic()  # the command returns once the quarantine is published
        took_quarantine = _until(lambda: set(_get(f"{url}/version")[1]["quarantine"]["adapters"]) == affected, 2,
                                 f"the quarantine of adapters {sorted(affected)} on the server")
        time.sleep(3)
        # applied without a reload: whichever worker answers still serves what it loaded before the request
        assert all(datetime.fromisoformat(_get(f"{url}/version")[1]["loaded_at"]) < deferred_at for _ in range(12))
        retrain = time.monotonic()
        result = legonet("requests", "run", cwd=root)
        assert "WARNING" not in result.stderr, result.stderr  # MLflow's cloudpickle and signature warnings are gone
        new = str(json.loads(result.stdout.strip().splitlines()[-1])["model_version"])
        assert new != "1"
        # each worker swaps on its own poll: the switch is over once several answers in a row (either worker's)
        # name the new version; a loaded machine may take the second worker a few seconds longer to load it
        took = _until(lambda: all(_get(f"{url}/version")[1]["version"] == new for _ in range(8)), 30,
                      f"every worker serving version {new}")
        forgot = time.monotonic()
        time.sleep(3)  # both workers swap by themselves
        assert _get(f"{url}/version")[1]["quarantine"]["adapters"] == []  # the retrained version lifts it
    finally:
        stop.touch()
        load.wait(120)
    records = json.loads(results.read_text())
    summary, origin = records["summary"], records["origin"]
    assert summary["failed"] == 0, [r for r in records["records"] if r["status"] != 200][:5]
    assert summary["requests"] >= 0.9 * RATE * summary["seconds"], summary  # steady: none skipped
    assert set(summary["versions_in_order"]) == {"1", new}
    header = ",".join(map(str, sorted(affected)))

    def consulted(record: dict[str, Any]) -> set[int]:
        return {int(a) for row in record["adapters"] for a in row.split()}
    before = [r for r in records["records"] if r["sent"] < published - origin - 1]
    assert before and all(r["quarantine"] == "" and consulted(r) & affected for r in before)
    held = [r for r in records["records"] if published - origin + 2 < r["sent"] < retrain - origin]
    assert held and all(r["version"] == "1" and r["quarantine"] == header and not consulted(r) & affected
                        for r in held), [r for r in held if consulted(r) & affected][:3]
    after = [r for r in records["records"] if r["sent"] > forgot - origin + 2]
    assert after and all(r["version"] == new and r["quarantine"] == "" for r in after)
    print(f"load: {summary}; quarantine served {took_quarantine:.2f} s after `forget --defer` returned, "
          f"version {new} {took:.2f} s after `requests run` returned")

    # a version that cannot load: the old one keeps serving, /health says why
    mlflow.set_tracking_uri(_store(root))
    client = mlflow.MlflowClient()
    broken = client.create_model_version("legonet", source=str(tmp_path / "no-such-model"), tags=dict(
        client.get_model_version("legonet", new).tags))
    client.set_registered_model_alias("legonet", "champion", broken.version)

    def degraded() -> bool:  # asked of whichever worker answers: each polls the registry on its own
        status, health, _ = _get(f"{url}/health")
        return (status == 200 and health["status"] == "degraded" and health["serving"]["version"] == new
                and (health.get("load_failure") or {}).get("version") == str(broken.version))
    _until(lambda: all(degraded() for _ in range(4)), 30, "the load failure on every worker's /health")
    assert _post(f"{url}/invocations", {"inputs": {"image": [image]}})[0]["adapters"]
    # the forget's version links to its package run, as a build's does
    forgot_version = client.get_model_version("legonet", new)
    assert forgot_version.run_id and forgot_version.run_id == forgot_version.tags["package_run_id"]

    # a quarantine tag that cannot be read stops predictions (never read as "no quarantine")
    client.set_model_version_tag("legonet", new, QUARANTINE_TAG, '{"adapters": "0"}')

    def refused() -> bool:
        try:
            _post(f"{url}/invocations", {"inputs": {"image": [image]}})
        except urllib.error.HTTPError as exc:
            return exc.code == 503 and "legonet.quarantine" in exc.read().decode()
        return False
    _until(lambda: all(refused() for _ in range(4)), 5, "predictions refused for an unreadable quarantine")
