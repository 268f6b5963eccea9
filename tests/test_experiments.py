"""DVC's own experiment workflow on a legonet project, with no legonet command in between: `dvc exp run -S` and a
queued experiment (`dvc exp run --queue`, `dvc queue start`) sweep adapters.n and adapters.k, compare in
`dvc exp show`, and register their models in the project's MLflow store as candidates tagged with the
experiment's name; the champion stays where it was until `legonet promote`.

Runtime (2 cores): two experiments on copies of the session's ``built_project``, each a rebuild from the keys
stage on (about a minute each).
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY, copy_project, legonet

from pipeline.data.dataset import read_yaml
from pipeline.project.init import defaults_from_data
from pipeline.project.params import (
    FOREACH,
    PARAMS,
    ParamsError,
    check_generated,
    generated_lists,
    load_params,
    sync_generated,
)


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def experiments(root: Path) -> dict[str, dict[str, str]]:
    """`dvc exp show` as a table: each experiment's row (params and metrics as columns), by name (the workspace and
    baseline rows have none)."""
    rows = csv.DictReader(io.StringIO(dvc("exp", "show", "--csv", cwd=root).stdout))
    return {row["Experiment"]: row for row in rows if row["Experiment"]}


def registry(root: Path) -> tuple[str, Any]:
    """The project's champion version and its newest version (with tags and aliases), from its own store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    champion = str(client.get_model_version_by_alias("legonet", "champion").version)
    newest = max(client.search_model_versions("name='legonet'"), key=lambda v: int(v.version))
    return champion, client.get_model_version("legonet", newest.version)


def head(root: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()


def assert_candidate_of(version: Any, name: str, baseline: str) -> None:
    assert version.aliases == ["candidate"], version.aliases
    assert version.tags["dvc_exp_name"] == name
    assert version.tags["dvc_exp_baseline_rev"] == baseline
    assert f"DVC experiment {name}" in version.tags["gate_reason"]


def test_the_generated_lists_do_not_depend_on_n_and_a_changed_block_count_names_the_fix() -> None:
    params = {"data": {"partitions": 2}, "adapters": {"n": 4, "k": 2, "blocks": 8}}
    lists = generated_lists(params)
    assert lists["train_blocks"] == [f"{b:04d}" for b in range(8)]
    for n in (1, 8, 64):
        assert generated_lists({**params, "adapters": {**params["adapters"], "n": n}}) == lists
    check_generated({**params, **lists})
    with pytest.raises(ParamsError, match=r"adapters.blocks is 3.*run `legonet build`"):
        check_generated({**params, **lists, "adapters": {**params["adapters"], "blocks": 3}})
    with pytest.raises(ParamsError, match=r"data.partitions=3.*legonet init --force"):
        check_generated({**params, **lists, "data": {"partitions": 3}})


def test_the_lists_live_apart_from_the_params_and_a_project_of_either_layout_stays_built(built_project: Path,
                                                                                          tmp_path: Path) -> None:
    """The generated lists sit in foreach.yaml (dvc.yaml's `vars`), committed, and params.yaml holds none (DVC
    parses params.yaml again for every stage it checks); a dvc.yaml without the `vars` entry (a project made
    before) reads them from params.yaml again, and putting the entry back moves them out; DVC sees the same
    stages throughout: `dvc status` stays clean."""
    lists = generated_lists(load_params(built_project))
    assert {key: read_yaml(built_project / FOREACH)[key] for key in lists} == lists
    assert not set(lists) & set(read_yaml(built_project / PARAMS))
    tracked = subprocess.run(["git", "ls-files", FOREACH.as_posix()], cwd=built_project, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked == [FOREACH.as_posix()]
    root = copy_project(built_project, tmp_path / "p")
    hand_written = (root / PARAMS).read_bytes()
    pipeline = (root / "dvc.yaml").read_text()
    older = pipeline.replace("vars:\n", "", 1).replace("  - foreach.yaml\n", "", 1)
    assert "vars:" not in older and "  - foreach.yaml" not in older
    (root / "dvc.yaml").write_text(older)
    assert sync_generated(root)
    assert not (root / FOREACH).exists()
    assert {key: read_yaml(root / PARAMS)[key] for key in lists} == lists
    assert dvc("status", "--json", cwd=root).stdout.strip() == "{}"
    assert not sync_generated(root)
    (root / "dvc.yaml").write_text(pipeline)
    assert sync_generated(root)
    assert (root / PARAMS).read_bytes() == hand_written
    assert (root / FOREACH).read_bytes() == (built_project / FOREACH).read_bytes()
    assert dvc("status", "--json", cwd=root).stdout.strip() == "{}"
    assert not sync_generated(root)


def test_init_chooses_no_more_blocks_than_adapters() -> None:
    params = {"adapters": {"n": 32, "k": 3, "blocks": 32},
              "data": {"reference_fraction": 0.1, "test_fraction": 0.2, "partitions": 4}}
    chosen = {key: value for key, value, _ in defaults_from_data(params, {"data": 5000}, set())}
    assert chosen["adapters.n"] == chosen["adapters.blocks"] == 16
    kept = defaults_from_data(params, {"data": 5000}, {"adapters.blocks"})  # --set wins
    assert all(key != "adapters.blocks" for key, _, _ in kept)


def test_dvc_exp_run_sweeps_n_and_leaves_the_champion(built_project: Path, tmp_path: Path) -> None:
    root = copy_project(built_project, tmp_path / "project")
    champion, before = registry(root)
    baseline = head(root)
    # n below adapters.blocks: the case whose generated list used to change with n (one adapter, one empty block)
    assert int(TINY["adapters.blocks"]) > 1
    dvc("exp", "run", "-S", "adapters.n=1", "-S", "adapters.k=1", cwd=root)
    (name, row), = experiments(root).items()
    assert row["adapters.n"] == "1" and float(row["accuracy"]) > 0
    assert (root / "data" / "shards" / "block-0001" / "EMPTY").is_file()
    still, version = registry(root)
    assert still == champion and int(version.version) == int(before.version) + 1
    assert_candidate_of(version, name, baseline)

    # promotion is a deliberate act, by version number or by experiment name
    missing = legonet("promote", "999", cwd=root, check=False)
    assert missing.returncode == 6 and "no version 999" in missing.stderr
    out = legonet("promote", name, cwd=root).stdout
    assert f"version {version.version} is now @champion (was version {champion})" in out
    champion, promoted = registry(root)
    assert champion == str(version.version) and promoted.aliases == ["champion"]


def test_a_queued_experiment_registers_in_the_projects_store(built_project: Path, tmp_path: Path) -> None:
    root = copy_project(built_project, tmp_path / "project")
    champion, before = registry(root)
    baseline = head(root)
    dvc("exp", "run", "--queue", "-S", "adapters.n=8", "-S", "adapters.k=3", cwd=root)
    try:
        # the worker runs detached: wait on the queue, not on the process
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start"], cwd=root, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 1200
        while (status := dvc("queue", "status", cwd=root).stdout) and any(
                state in status for state in ("Queued", "Running")):
            assert time.monotonic() < deadline, status
            time.sleep(5)
    finally:
        dvc("queue", "stop", "--kill", cwd=root, check=False)
    assert "Success" in status, status
    (name, row), = experiments(root).items()
    assert row["adapters.n"] == "8" and row["adapters.k"] == "3" and float(row["accuracy"]) > 0
    # the temporary copy the experiment ran in has no mlflow.db: the version is in the project's own store
    still, version = registry(root)
    assert still == champion and int(version.version) == int(before.version) + 1
    assert_candidate_of(version, name, baseline)
