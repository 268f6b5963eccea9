"""Guards of a project's state: the lock file, and `legonet init --force` on a project with a forget history.

A forget's promise would be void if the same data could be put back by re-initialising the project while a forget
is half done, or at any later time; and a link planted at the lock's path must not let legonet truncate a file
elsewhere. Each case is refused with one error line (exit 3) and changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import copy_project, init_args, legonet, mlflow_server
from mlflow import MlflowClient
from test_forget import forget, tree_md5, write_manifest

from pipeline.data.dataset import read_table, write_table
from pipeline.errors import LockBusy
from pipeline.project.params import load_params
from pipeline.project.scratch import SCRATCH, scratch_dir
from pipeline.tracking import quarantine
from pipeline.tracking.head import LEASE_TAG, check_head, registry_lease, writer_lease
from pipeline.tracking.registry import project_store


@pytest.fixture()
def project(tmp_path: Path, built_project: Path) -> Path:
    return copy_project(built_project, tmp_path / "project")


def test_a_link_at_the_lock_path_is_refused_and_its_target_kept(project: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("not legonet's to truncate\n")
    (project / ".legonet").mkdir(exist_ok=True)
    (project / ".legonet" / "lock").unlink(missing_ok=True)
    (project / ".legonet" / "lock").symlink_to(precious)
    sample = sorted(read_table(project / "data/routing.parquet")["sample_id"])[0]
    manifest = write_manifest(tmp_path / "m.json", "r-link", [sample])
    before = tree_md5(project, skip=())

    for args in (("forget", str(manifest)), ("build",)):
        result = legonet(*args, cwd=project, check=False)
        assert result.returncode == 3, (args, result.returncode, result.stderr)
        assert "is a symbolic link" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert precious.read_text() == "not legonet's to truncate\n"
    assert tree_md5(project, skip=()) == before


def test_init_force_waits_for_an_interrupted_forget_and_never_brings_forgotten_samples_back(
        project: Path, tmp_path: Path, tiny_data: Path) -> None:
    forgotten = sorted(read_table(project / "data/routing.parquet")["sample_id"])[3]
    manifest = write_manifest(tmp_path / "m.json", "r-guard", [forgotten])
    crashed = legonet("forget", str(manifest), cwd=project, check=False,
                      env={"LEGONET_CRASH_AFTER": "data-removed"})
    assert crashed.returncode != 0 and (project / ".legonet/journal.json").is_file()

    before = tree_md5(project)
    pending = legonet(*init_args(tiny_data), "--force", cwd=project, check=False)
    assert pending.returncode == 3 and "was interrupted" in pending.stderr and "r-guard" in pending.stderr, \
        pending.stderr
    assert tree_md5(project) == before, "init --force changed a project with a pending forget"

    legonet("forget", str(manifest), cwd=project)  # finishes the interrupted forget
    before = tree_md5(project)
    back = legonet(*init_args(tiny_data), "--force", cwd=project, check=False)
    message = " ".join(back.stderr.split())
    assert back.returncode == 3 and repr(forgotten) in message and "forgotten by an earlier request" in message, \
        message
    assert tree_md5(project) == before, "init --force changed the project for refused data"

    clean = tmp_path / "clean.parquet"
    frame = read_table(tiny_data)
    write_table(frame[frame["sample_id"] != forgotten].reset_index(drop=True), clean)
    legonet(*init_args(clean), "--force", cwd=project)  # the data without the forgotten sample is welcome


def test_scratch_folders_of_dead_processes_are_swept_by_the_next_one(tmp_path: Path) -> None:
    """A package staged by a process that was killed holds whole adapters: the next scratch folder removes it,
    and never one whose process still runs."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    base = tmp_path / SCRATCH
    killed = base / f"package-{int(dead.stdout)}-abc123"
    running = base / f"package-{os.getpid()}-def456"
    for folder in (killed, running):
        (folder / "artifacts").mkdir(parents=True)
        (folder / "artifacts" / "adapter-0000.safetensors").write_bytes(b"weights")

    with scratch_dir(tmp_path, "package") as fresh:
        assert fresh.parent == base and fresh.name.startswith(f"package-{os.getpid()}-")
        assert not killed.exists() and running.is_dir()
    assert not fresh.exists() and sorted(p.name for p in base.iterdir()) == [running.name]


def test_a_build_leaves_no_scratch_behind(built_project: Path) -> None:
    scratch = built_project / SCRATCH
    assert scratch.is_dir(), "the package stage stages its model under .legonet/tmp"
    assert list(scratch.iterdir()) == []


def test_a_clone_behind_the_registry_head_refuses_to_forget_or_build(tmp_path: Path, built_project: Path) -> None:
    """Two clones on one MLflow store: after a forget in one, the other refuses (nothing changed) until it pulls,
    so the audit log never forks and no build registers a model trained on samples already forgotten."""
    first = copy_project(built_project, tmp_path / "first")
    second = copy_project(first, tmp_path / "second")
    (second / "mlflow.db").unlink()
    (second / "mlflow.db").symlink_to(first / "mlflow.db")  # one shared store, as an `mlflow server` would be
    ids = sorted(read_table(first / "data/routing.parquet")["sample_id"])
    forget(first, write_manifest(tmp_path / "a.json", "r-first", [ids[0]]))

    before = tree_md5(second)
    for args in (("forget", str(write_manifest(tmp_path / "b.json", "r-second", [ids[1]]))), ("build",)):
        result = legonet(*args, cwd=second, check=False)
        message = " ".join(result.stderr.split())
        assert result.returncode == 3 and "another clone of this project forgot" in message, (args, message)
        assert "git pull" in message and "Traceback" not in result.stderr
    assert tree_md5(second) == before, "a refused command changed the clone"

    subprocess.run(["git", "pull", "-q", str(first), "HEAD"], cwd=second, check=True, capture_output=True)
    check_head(second, load_params(second), project_store(load_params(second)["mlflow"]))  # extends it now


def test_two_clones_never_write_at_once_a_held_lease_refuses_the_other(tmp_path: Path, built_project: Path) -> None:
    """Two clones on one MLflow store, both at the registry's head: while one holds the writer lease (a forget or
    build under way), the other's forget and build refuse at once (exit 7) and change nothing; the holder may take
    it again (a re-run after a crash), and it is gone once released."""
    first = copy_project(built_project, tmp_path / "first")
    second = copy_project(first, tmp_path / "second")
    (second / "mlflow.db").unlink()
    (second / "mlflow.db").symlink_to(first / "mlflow.db")  # one shared store, as an `mlflow server` would be
    settings = load_params(first)["mlflow"]  # the store as the clones' commands resolve it, from their folder
    store = {**settings, "tracking_uri": f"sqlite:///{(first / 'mlflow.db').resolve()}"}
    ids = sorted(read_table(first / "data/routing.parquet")["sample_id"])

    def project_files() -> dict[str, str]:  # all but the shared store, which the lease itself is written to
        return {p: d for p, d in tree_md5(first).items() if p != "mlflow.db"}

    before = project_files()
    with writer_lease(second, store):
        assert json.loads(registry_lease(store) or "{}").get("clone"), "the lease is on the shared store"
        # a build with work to do (an up-to-date one writes nothing and needs no lease)
        for args in (("forget", str(write_manifest(tmp_path / "a.json", "r-first", [ids[0]]))), ("build", "--force")):
            result = legonet(*args, cwd=first, check=False)
            message = " ".join(result.stderr.split())
            assert result.returncode == 7 and "another clone of this project is forgetting or building" in message
            assert "Traceback" not in result.stderr, result.stderr
        with writer_lease(second, store):  # its own lease: a forget re-run in the same clone goes on
            pass
    assert project_files() == before, "a refused command changed the clone"
    assert registry_lease(store) is None, "the lease outlived its holder"


def test_on_an_mlflow_server_one_of_two_clones_racing_for_the_lease_wins(tmp_path: Path) -> None:
    """`mlflow server` has no compare-and-set: two clones that write the lease at the same moment both read it
    back, and exactly one of them holds it; an expired lease is free to take."""
    home = tmp_path / "server"
    home.mkdir()
    with mlflow_server(home, str(home / "artifacts")) as server:
        MlflowClient(server["uri"]).create_registered_model("shared-model")
        store = {"tracking_uri": server["uri"], "registered_model": "shared-model"}
        clones = [tmp_path / "a", tmp_path / "b"]
        for clone in clones:
            clone.mkdir()
        start, outcome = threading.Barrier(2), {}

        def race(clone: Path) -> None:
            start.wait()
            try:
                with writer_lease(clone, store):
                    outcome[clone.name] = "held"
                    time.sleep(2)  # hold it while the other reads it back
            except LockBusy:
                outcome[clone.name] = "refused"

        threads = [threading.Thread(target=race, args=(c,)) for c in clones]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcome.values()) == ["held", "refused"], outcome
        assert registry_lease(store) is None

        stale = {"clone": "another", "expires": "2000-01-01T00:00:00+00:00"}
        MlflowClient(server["uri"]).set_registered_model_tag("shared-model", LEASE_TAG, json.dumps(stale))
        with writer_lease(clones[0], store):  # a lease its holder let expire is taken over
            assert json.loads(registry_lease(store) or "{}").get("clone") != "another"

        # the quarantine is written the same way, without MLflow: on the newest version and every aliased one
        client = MlflowClient(server["uri"])
        first = client.create_model_version("shared-model", source="s3://legonet-test/m1").version
        newest = client.create_model_version("shared-model", source="s3://legonet-test/m2").version
        client.set_registered_model_alias("shared-model", "champion", first)
        assert quarantine.publish(tmp_path, store, [3, 1], ["r-1"], "2026-01-01T00:00:00+00:00") == {
            str(first): [1, 3], str(newest): [1, 3]}
        quarantine.publish(tmp_path, store, [2], ["r-2"], "2026-01-02T00:00:00+00:00")  # accumulates
        for version in (first, newest):
            tags = client.get_model_version("shared-model", version).tags
            assert quarantine.read(tags, str(version))[0] == {1, 2, 3}
