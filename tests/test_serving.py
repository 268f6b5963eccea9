"""Serving the built model: `legonet predict` on CSV and Parquet, the packaged pyfunc, and `mlflow models serve`
of `models:/legonet@champion` all give the same predictions for the same samples (real processes, no mocks)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import legonet

from pipeline.data.dataset import read_table, write_table


@pytest.fixture(scope="module")
def test_samples(built_project: Path) -> pd.DataFrame:
    """One held-out test sample of each class of the built project."""
    frame = read_table(built_project / "data/test/test.parquet")
    return frame.groupby("label").head(1).sort_values("sample_id").reset_index(drop=True)


def _classes(project: Path) -> list[int]:
    return list(yaml.safe_load((project / "params.yaml").read_text())["data"]["classes"])


def _predict_cli(project: Path, file: Path) -> pd.DataFrame:
    result = legonet("predict", str(file), cwd=project)
    return pd.read_csv(io.StringIO(result.stdout), dtype={"sample_id": str})


def test_predict_cli_csv_and_parquet_agree_with_the_package(built_project: Path, test_samples: pd.DataFrame,
                                                            tmp_path: Path) -> None:
    parquet = tmp_path / "samples.parquet"
    write_table(test_samples, parquet)
    csv = tmp_path / "samples.csv"
    test_samples.assign(image=[" ".join(str(b) for b in image) for image in test_samples["image"]]).to_csv(
        csv, index=False)

    from_parquet = _predict_cli(built_project, parquet)
    from_csv = _predict_cli(built_project, csv)
    assert list(from_parquet.columns[:2]) == ["sample_id", "prediction"]
    classes = _classes(built_project)
    assert len(classes) >= 2 and len(test_samples) == len(classes)
    assert list(from_parquet.columns[2:]) == [*(f"proba_{c}" for c in classes), "adapters"]
    assert from_parquet["sample_id"].tolist() == test_samples["sample_id"].tolist()
    assert set(from_parquet["prediction"]) <= set(classes)
    np.testing.assert_allclose(from_parquet[[f"proba_{c}" for c in classes]].sum(axis=1), 1.0, atol=1e-5)
    pd.testing.assert_frame_equal(from_parquet, from_csv)
    assert (from_parquet["prediction"] == test_samples["label"]).mean() >= 0.5  # the tiny build passes gate 0.5

    import mlflow

    # The DVC-tracked package (models/package) is the registered champion: same predictions, in this process.
    packaged = mlflow.pyfunc.load_model(str(built_project / "models/package"))
    direct = packaged.predict(test_samples[["image"]])
    pd.testing.assert_frame_equal(direct, from_parquet.drop(columns=["sample_id"]), check_dtype=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(port: int, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer /ping in {timeout} s:\n{log.read_text()}")


def test_mlflow_serves_the_champion_like_legonet_predict(built_project: Path, test_samples: pd.DataFrame,
                                                        tmp_path: Path) -> None:
    write_table(test_samples, parquet := tmp_path / "samples.parquet")
    expected = _predict_cli(built_project, parquet)

    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{built_project / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/legonet@champion",
           "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_for_ping(port, server, log)
        rows = [[np.frombuffer(image, dtype=np.uint8).astype(int).tolist()] for image in test_samples["image"]]
        assert all(len(row[0]) == 784 for row in rows)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = pd.DataFrame(json.loads(response.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    assert len(served) == len(test_samples)
    assert served["prediction"].tolist() == expected["prediction"].tolist()
    assert served["adapters"].tolist() == expected["adapters"].tolist()
    # the model computes float32; the CSV prints float32 digits, JSON float64 ones: equal as float32, bit for bit
    for column in (f"proba_{c}" for c in _classes(built_project)):
        np.testing.assert_array_equal(served[column].to_numpy(np.float32), expected[column].to_numpy(np.float32))
