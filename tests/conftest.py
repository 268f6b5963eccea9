"""Shared fixtures: tiny real projects (git + DVC + MLflow SQLite + torch) built through the CLI, as a user would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.audit.keyring import IN_PROJECT, key_dir
from pipeline.data.dataset import bundled_mnist, write_table
from pipeline.errors import ParamsError
from pipeline.project.params import load_params

# A small configuration so a full build is ~14 DVC stages: the same code paths as the default, less work.
TINY = {
    "data.partitions": 2,
    "encoder.image_size": 32,
    "projection.dim": 32,
    "adapters.n": 4,
    "adapters.k": 2,
    "adapters.blocks": 2,  # two adapters per train stage: exercises retraining only the stale ones of a block
    "adapters.train.epochs": 8,
    "gate.min_accuracy": 0.5,
}
TINY_STRIDE = 5  # every 5th bundled digit: 1,000 samples, all ten classes (the bundle is sorted by class)


def legonet(*args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run the real `legonet` console script in a subprocess, like a user at a shell."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli.main", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"legonet {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def init_args(data: Path, overrides: dict[str, object] | None = None) -> list[str]:
    settings = {**TINY, **(overrides or {})}
    return ["init", ".", "--data", str(data), *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="session", autouse=True)
def key_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The per-user data folder, where projects keep their audit keys by default: a session folder, so no test
    ever writes keys into the real home (every `legonet` subprocess inherits it)."""
    home = tmp_path_factory.mktemp("xdg-data")
    saved = {name: os.environ.pop(name, None) for name in ("XDG_DATA_HOME", "LEGONET_KEY_DIR")}
    os.environ["XDG_DATA_HOME"] = str(home)
    yield home
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stratified tenth of the bundled MNIST digits as a user's Parquet file."""
    path = tmp_path_factory.mktemp("data") / "samples.parquet"
    write_table(bundled_mnist().iloc[::TINY_STRIDE].reset_index(drop=True), path)
    return path


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """One tiny project, initialised and built once per session. Tests that change it must copy it first."""
    root = tmp_path_factory.mktemp("built")
    legonet(*init_args(tiny_data), cwd=root)
    legonet("build", cwd=root)
    return root


def copy_project(src: Path, dst: Path) -> Path:
    """A private copy of a built project (git, DVC cache, MLflow store and all) for a test that changes it.

    MLflow stores absolute artifact locations (experiment, runs, logged models, model versions); a plain copy
    would log into, and a forget's `mlflow gc` delete from, the original's mlartifacts/. They are rewritten to
    the copy.

    A copy has the original's project ID, so it would share its per-user key dir (and the checkpoint kept there,
    which the copy's own log soon leaves behind): the copy keeps its keys in its own folder (``.legonet/keys``,
    where `legonet` finds them), starting from the original's.
    """
    shutil.copytree(src, dst, symlinks=True)
    if not (dst / IN_PROJECT).exists():
        try:
            keys = key_dir(src, load_params(src))
        except ParamsError:  # a project without an ID (made before IDs) has no per-user key dir
            keys = dst / IN_PROJECT
        shutil.copytree(keys, dst / IN_PROJECT) if keys.is_dir() else (dst / IN_PROJECT).mkdir(parents=True)
    old, new = str(src.resolve()), str(dst.resolve())
    if not (dst / "mlflow.db").is_file():
        return dst
    with sqlite3.connect(dst / "mlflow.db") as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in [c[1] for c in db.execute(f'PRAGMA table_info("{table}")')]:
                db.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?) '
                           f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0', (old, new, old))
    with sqlite3.connect(dst / "mlflow.db") as db:
        db.execute("VACUUM")
    assert old.encode() not in (dst / "mlflow.db").read_bytes()
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(home: Path, artifacts_destination: str, env: dict[str, str] | None = None
                  ) -> Iterator[dict[str, str]]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend in ``home``, proxied artifacts); stopped by process
    group. ``env`` adds variables for the server, e.g. MLFLOW_S3_ENDPOINT_URL for an S3 destination."""
    port, backend = free_port(), f"sqlite:///{home / 'server.db'}"
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below, after the server is gone)
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend, "--artifacts-destination", artifacts_destination],
        cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a loaded 2-core machine has taken over 2 minutes to start it
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"uri": uri, "backend": backend, "log": str(home / "server.log")}
    finally:
        stop_group(process)
        log.close()


def stop_group(process: subprocess.Popen) -> None:
    """Stop a server started with ``start_new_session=True`` and its children (uvicorn workers): SIGTERM to its
    process group, SIGKILL after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group has already exited
        return
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
