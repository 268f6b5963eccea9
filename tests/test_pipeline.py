"""The pipeline end to end, for real (git + DVC + MLflow SQLite + ONNX Runtime + torch; no mocks).

Issue 2's acceptance points: a build reports its accuracy and is idempotent; DVC reruns exactly the stages a data
change touches; two fresh builds of the same data are bit-identical; every stage leaves an MLflow run whose
digests join to dvc.lock; bad input is refused before anything is written. Serving is in tests/test_serving.py.

Runtime: the session's `built_project` (one build, ~80 s) is shared read-only; `second_build` is one more fresh
build (~80 s) that the exactness test compares and the incremental test then changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY, copy_project, init_args, legonet

from pipeline.data.dataset import read_table, write_table
from pipeline.data.salt import secret_path
from pipeline.project.layout import adapter_path, block_of, shard_path
from pipeline.tracking.lineage import file_md5

UP_TO_DATE = "Data and pipelines are up to date."
RUNNING = re.compile(r"^Running stage '([^']+)':", re.MULTILINE)
PARTITIONS = int(TINY["data.partitions"])
ADAPTERS = int(TINY["adapters.n"])
BLOCKS = int(TINY["adapters.blocks"])
ALL_STAGES = {"encoder", *(f"encode@part-{p:04d}" for p in range(PARTITIONS)), "encode@reference", "encode@test",
              "keys", "assign", *(f"train@{b:04d}" for b in range(BLOCKS)), "quality", "baseline", "evaluate",
              "package"}


def shard(j: int) -> str:
    return shard_path(j, ADAPTERS, BLOCKS).as_posix()


def adapter(j: int, ext: str = "safetensors") -> str:
    return adapter_path(j, ADAPTERS, BLOCKS).with_suffix(f".{ext}").as_posix()
# What MLflow writes into MLmodel that is not a function of the model: a fresh uuid, the save time, and the
# temporary staging folder the artifacts were copied from (stages/package.py uses a new TemporaryDirectory).
MLMODEL_VOLATILE = ("model_uuid", "utc_time_created")


def digests(root: Path, *tops: str) -> dict[str, str]:
    """md5 of every file under the given top-level files or folders of ``root``, keyed by relative path."""
    out = {}
    for top in tops:
        path = root / top
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out.update({f.relative_to(root).as_posix(): file_md5(f) for f in files})
    return out


def project_digests(root: Path) -> dict[str, str]:
    """Every file of a project except git's and DVC's own bookkeeping (.git, .dvc/tmp, the cache); hashed here, not
    through the project's digest store, which a look must not change."""
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in (".git", ".dvc")}


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result


def mlmodel_without_volatile(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    for key in MLMODEL_VOLATILE:
        assert key in doc, f"{path}: expected MLflow to write {key}"
        doc.pop(key)
    for artifact in doc["flavors"]["python_function"]["artifacts"].values():
        artifact.pop("uri")  # absolute path of the package stage's temporary staging folder
    return doc


@pytest.fixture(scope="module")
def second_build(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, built_project: Path) -> dict:
    """A second fresh init + build of the same data in another folder, with the first's data secret (the salt of
    every data artifact, pipeline.data.salt), its output and digests recorded right after the build
    (test_incremental_rebuild changes this project later; the snapshot does not move)."""
    root = tmp_path_factory.mktemp("second")
    legonet(*init_args(tiny_data), "--data-secret", str(secret_path(built_project)), cwd=root)
    build = legonet("build", cwd=root)
    return {"root": root, "stdout": build.stdout, "digests": digests(root, "data", "models", "metrics"),
            "dvc.lock": yaml.safe_load((root / "dvc.lock").read_text()),
            "MLmodel": mlmodel_without_volatile(root / "models/package/MLmodel")}


# 1. build output, metrics, idempotence -----------------------------------------------------------------------------

def test_build_reports_accuracy_and_metrics(second_build: dict, built_project: Path) -> None:
    out = second_build["stdout"]
    assert f"stages run: {len(ALL_STAGES)} " in out, out
    metrics = json.loads((second_build["root"] / "metrics/evaluate.json").read_text())
    assert f"test accuracy (LegoNet ensemble): {metrics['accuracy']:.4f}" in out, out
    probe = json.loads((second_build["root"] / "metrics/baseline.json").read_text())
    assert f"test accuracy (single linear probe, same features): {probe['probe_accuracy']:.4f}" in out, out
    assert "registered model version 1 aliases [champion]" in out, out

    for root in (built_project, second_build["root"]):
        evaluate = json.loads((root / "metrics/evaluate.json").read_text())
        baseline = json.loads((root / "metrics/baseline.json").read_text())
        assert math.isfinite(evaluate["accuracy"]) and 0.5 <= evaluate["accuracy"] <= 1.0, evaluate
        assert math.isfinite(baseline["probe_accuracy"]) and 0.5 <= baseline["probe_accuracy"] <= 1.0, baseline
        assert evaluate["test_samples"] == len(read_table(root / "data/test/test.parquet")) > 0
        shown = dvc("metrics", "show", "--json", cwd=root).stdout
        assert str(evaluate["accuracy"]) in shown and str(baseline["probe_accuracy"]) in shown, shown


def test_second_build_and_repro_are_no_ops(built_project: Path) -> None:
    before = project_digests(built_project)
    assert any(p.startswith("models/adapters/") for p in before) and "mlflow.db" in before

    again = legonet("build", cwd=built_project)
    assert UP_TO_DATE in again.stdout, again.stdout
    assert "stages run" not in again.stdout and "registered model version" not in again.stdout, again.stdout
    assert "test accuracy (LegoNet ensemble): " in again.stdout, again.stdout

    repro = dvc("repro", cwd=built_project)
    assert UP_TO_DATE in repro.stdout, repro.stdout
    assert RUNNING.findall(repro.stdout) == [], repro.stdout
    assert UP_TO_DATE in dvc("status", cwd=built_project).stdout

    after = project_digests(built_project)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert changed == [], f"an up-to-date build changed files: {changed}"


def test_a_build_after_a_failed_repro_leaves_the_project_up_to_date(built_project: Path, tmp_path: Path) -> None:
    """A `dvc repro` that fails takes back the .gitignore entries of the stages it ran, among them the one inside
    data/encoded/train, a folder `assign` reads; a stage that runs before the entry is back records the folder
    without it. The next `legonet build` puts the entries back first, so whatever it leaves is up to date (it used
    to put them back last: the project was stale after a successful build and the next forget refused)."""
    root = copy_project(built_project, tmp_path / "p")
    (root / "data/encoded/train/.gitignore").unlink()  # what the failed repro left
    assert RUNNING.findall(dvc("repro", cwd=root).stdout) == ["assign"]  # records the folder without it

    built = legonet("build", cwd=root)
    assert (root / "data/encoded/train/.gitignore").is_file()
    assert UP_TO_DATE in dvc("status", cwd=root).stdout, built.stdout
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                          check=True).stdout == ""


# 3. two fresh builds are bit-identical -----------------------------------------------------------------------------

def test_two_fresh_builds_are_bit_identical(built_project: Path, second_build: dict) -> None:
    """Every file under data/, models/ and metrics/ of two independent builds of the same data has the same bytes;
    the only exception is MLflow's own MLmodel metadata, compared with its uuid, creation time and staging-folder
    URIs removed (they are not a function of the model). dvc.lock is equal except the package's directory digest,
    which covers MLmodel."""
    first = digests(built_project, "data", "models", "metrics")
    second = second_build["digests"]
    assert first.keys() == second.keys(), sorted(first.keys() ^ second.keys())
    assert len([p for p in first if p.startswith("models/adapters/") and p.endswith(".safetensors")]) == ADAPTERS
    differing = sorted(p for p in first if first[p] != second[p])
    code = [p for p in differing if p.startswith("models/package/code/")]
    assert not code, (f"the packaged code differs between the builds: {code}; was the checkout's pipeline/ edited "
                      "while the tests ran? (the package ships that code)")
    assert differing == ["models/package/MLmodel"], differing
    assert mlmodel_without_volatile(built_project / "models/package/MLmodel") == second_build["MLmodel"]

    lock_a = yaml.safe_load((built_project / "dvc.lock").read_text())
    lock_b = second_build["dvc.lock"]
    for lock in (lock_a, lock_b):
        (out,) = lock["stages"]["package"]["outs"]
        assert out["path"] == "models/package" and out.pop("md5").endswith(".dir")
        out.pop("size")
        (docs,) = [o for o in lock["stages"]["quality"]["outs"] if o["path"] == "reports/quality/data_docs"]
        assert docs.pop("md5").endswith(".dir")  # its pages carry the validation time; result.json is compared
        docs.pop("size"), docs.pop("nfiles")
    assert set(lock_a["stages"]) == ALL_STAGES
    assert lock_a == lock_b


# 2. incremental rebuild --------------------------------------------------------------------------------------------

def test_incremental_rebuild_runs_exactly_the_affected_stages(second_build: dict) -> None:
    root = second_build["root"]
    routing = read_table(root / "data/routing.parquet")
    routing["pair"] = [tuple(sorted(int(a) for a in row)) for row in routing["adapters"]]
    in_part = routing[routing["partition"] == 1]
    pair = in_part["pair"].value_counts().index[0]  # remove samples that share their adapters: fewer retrained
    removed = sorted(in_part.loc[in_part["pair"] == pair, "sample_id"])[:3]
    assert len(removed) == 3 and len(pair) < ADAPTERS

    raw = root / "data/raw/part-0001.parquet"
    frame = read_table(raw)
    assert frame["sample_id"].is_monotonic_increasing and set(removed) <= set(frame["sample_id"])
    before = digests(root, "data", "models")
    write_table(frame[~frame["sample_id"].isin(removed)], raw)
    assert read_table(raw)["sample_id"].is_monotonic_increasing and len(read_table(raw)) == len(frame) - 3

    repro = dvc("repro", cwd=root)
    ran = RUNNING.findall(repro.stdout)
    after = digests(root, "data", "models")

    shards = {j: shard(j) for j in range(ADAPTERS)}
    changed_shards = {j for j, path in shards.items() if before[path] != after[path]}
    assert changed_shards == set(pair), "routing.parquet predicts which shards a removal touches"
    expected = {"encode@part-0001", "assign", *(f"train@{block_of(j, ADAPTERS, BLOCKS):04d}" for j in changed_shards),
                "quality", "baseline", "evaluate", "package"}
    assert len(ran) == len(set(ran)) and set(ran) == expected, f"ran {ran}, expected {sorted(expected)}"

    unchanged = ["data/encoded/train/part-0000.parquet", "data/encoded/reference.parquet", "data/encoded/test.parquet",
                 "models/encoder.onnx", "models/encoder.json", "models/keys.npy", "models/projection.npy",
                 *(shard(j) for j in range(ADAPTERS) if j not in changed_shards),
                 *(adapter(j, ext) for j in range(ADAPTERS) if j not in changed_shards
                   for ext in ("safetensors", "json"))]
    assert [p for p in unchanged if before[p] != after[p]] == []
    must_change = ["data/encoded/train/part-0001.parquet", "data/routing.parquet",
                   *(adapter(j, "json") for j in changed_shards)]
    assert [p for p in must_change if before[p] == after[p]] == []

    for path in ("data/encoded/train/part-0001.parquet", "data/routing.parquet",
                 *(shard(j) for j in range(ADAPTERS))):
        ids = set(pd.read_parquet(root / path, columns=["sample_id"])["sample_id"])
        assert not ids & set(removed), f"{path} still holds a removed sample"
    assert UP_TO_DATE in dvc("repro", cwd=root).stdout


# 4. MLflow lineage -------------------------------------------------------------------------------------------------

def _dvc_digests(entries: list[dict], root: Path) -> dict[str, str]:
    """dvc.lock deps/outs as path -> md5; a directory's ``.dir`` digest is first checked against its files on disk
    (recomputed by dvc-data from the per-file md5s, as DVC does)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    out = {}
    for entry in entries:
        if not entry["md5"].endswith(".dir"):
            out[entry["path"]] = entry["md5"]
            continue
        files = digests(root, entry["path"])
        tree = Tree()
        for path, md5 in files.items():
            tree.add(tuple(Path(path).relative_to(entry["path"]).parts), Meta(), HashInfo("md5", md5))
        tree.digest()
        assert tree.hash_info.value == entry["md5"], f"{entry['path']}: files on disk do not match dvc.lock"
        out[entry["path"]] = entry["md5"]
    return out


def test_mlflow_lineage_joins_dvc_lock(built_project: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{built_project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("legonet")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(ALL_STAGES), "exactly one MLflow run per executed stage"

    lock = yaml.safe_load((built_project / "dvc.lock").read_text())["stages"]
    for run in runs:
        stage = run.info.run_name
        assert run.info.status == "FINISHED", stage
        tags = run.data.tags
        assert tags["legonet.stage"] == stage
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["legonet.code_revision"]), tags["legonet.code_revision"]
        inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert inputs == _dvc_digests(lock[stage].get("deps", []), built_project), stage
        outs = {k.removeprefix("out."): v for k, v in tags.items() if k.startswith("out.")}
        assert outs and outs == _dvc_digests(lock[stage]["outs"], built_project), stage

    (version,) = client.search_model_versions("name='legonet'")
    version = client.get_model_version("legonet", version.version)
    assert version.aliases == ["champion"]
    assert client.get_model_version_by_alias("legonet", "champion").version == version.version
    assert version.tags["dvc_lock_sha256"] == hashlib.sha256((built_project / "dvc.lock").read_bytes()).hexdigest()
    assert version.tags["gate"] == "passed"
    package_run = next(r for r in runs if r.info.run_name == "package")
    assert version.tags["package_run_id"] == package_run.info.run_id
    assert float(version.tags["accuracy"]) == json.loads((built_project / "metrics/evaluate.json").read_text())[
        "accuracy"]


# 6. bad input is refused before anything is written ----------------------------------------------------------------

def _tiny_frame(tiny_data: Path) -> pd.DataFrame:
    return read_table(tiny_data).iloc[::4].reset_index(drop=True)  # 250 samples, every class


def _missing_label(frame: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    return frame.drop(columns=["label"]), "'label'", {}


def _duplicate_id(frame: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    frame.loc[7, "sample_id"] = frame.loc[6, "sample_id"]
    return frame, frame.loc[6, "sample_id"], {}


def _unknown_label(frame: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """Classes given with --set are a contract: a label outside them is refused (not added to the classes)."""
    frame = frame[frame["label"] != 9].reset_index(drop=True)
    frame.loc[11, "label"] = 9
    return frame, frame.loc[11, "sample_id"], {"data.classes": "[0,1,2,3,4,5,6,7,8]"}


def _null_label(frame: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """One missing label must not turn every label into text ('0.0', 'nan')."""
    frame["label"] = frame["label"].astype("float64")
    frame.loc[3, "label"] = float("nan")
    return frame, frame.loc[3, "sample_id"], {}


def _id_ending_in_newline(frame: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    """An ID no manifest could name (the manifest refuses trailing whitespace) is refused in the data too."""
    frame.loc[4, "sample_id"] = frame.loc[4, "sample_id"] + "\n"
    return frame, "sample_id_rule", {}


def _short_image(frame: pd.DataFrame) -> tuple[pd.DataFrame, str, dict]:
    frame.at[5, "image"] = frame.at[5, "image"][:783]
    return frame, frame.loc[5, "sample_id"], {}


@pytest.mark.parametrize(("spoil", "suffix"), [
    (_missing_label, ".parquet"),
    (_null_label, ".parquet"),
    (_id_ending_in_newline, ".parquet"),
    (_duplicate_id, ".parquet"),
    (_unknown_label, ".parquet"),
    (_short_image, ".parquet"),
    (_short_image, ".csv"),
], ids=["missing-label", "null-label", "id-ending-in-newline", "duplicate-id", "label-not-in-classes",
        "image-783-bytes", "image-783-pixels-csv"])
def test_init_refuses_bad_data_and_writes_nothing(tmp_path: Path, tiny_data: Path, spoil, suffix: str) -> None:
    frame, named, overrides = spoil(_tiny_frame(tiny_data))
    bad = tmp_path / f"bad{suffix}"
    if suffix == ".csv":
        frame.assign(image=[" ".join(str(b) for b in image) for image in frame["image"]]).to_csv(bad, index=False)
    else:
        write_table(frame, bad)
    project = tmp_path / "project"
    project.mkdir()

    result = legonet(*init_args(bad, overrides), cwd=project, check=False)
    message = " ".join(result.stderr.split())  # rich may wrap a long line
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert str(bad) in message and named in message, message
    assert "Traceback" not in result.stderr, result.stderr
    assert list(project.iterdir()) == [], f"init wrote {sorted(p.name for p in project.iterdir())} for bad input"


def test_init_force_with_bad_data_keeps_the_project(tmp_path: Path, tiny_data: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    legonet(*init_args(tiny_data), cwd=project)
    before = project_digests(project)
    assert any(p.startswith("data/raw/") for p in before)
    frame, named, _ = _duplicate_id(_tiny_frame(tiny_data))
    write_table(frame, bad := tmp_path / "bad.parquet")

    result = legonet(*init_args(bad), "--force", cwd=project, check=False)
    assert result.returncode == 3 and named in result.stderr, result.stderr
    assert project_digests(project) == before


def test_unknown_encoder_is_refused_at_init_and_at_build(tmp_path: Path, tiny_data: Path) -> None:
    valid = ("efficientnet-lite0", "minilm")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = legonet(*init_args(tiny_data, {"encoder.name": "resnet-9000"}), cwd=fresh, check=False)
    message = " ".join(result.stderr.split())
    assert result.returncode == 4 and "resnet-9000" in message and all(v in message for v in valid), message
    assert list(fresh.iterdir()) == []

    # A project whose params.yaml is edited afterwards: `legonet build` refuses before any stage runs, and plain
    # `dvc repro` fails in the encoder stage; neither leaves an encoder file behind.
    project = tmp_path / "project"
    project.mkdir()
    legonet(*init_args(tiny_data), cwd=project)
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("name: efficientnet-lite0", "name: resnet-9000", 1))
    assert "resnet-9000" in params.read_text()
    build = legonet("build", cwd=project, check=False)
    message = " ".join(build.stderr.split())
    assert build.returncode != 0 and "resnet-9000" in message and all(v in message for v in valid), message
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True)
    output = repro.stdout + repro.stderr
    assert repro.returncode != 0 and RUNNING.findall(output) == ["encoder"], output
    assert "resnet-9000" in output and all(v in output for v in valid), output
    assert not (project / "models/encoder.onnx").exists() and not (project / "dvc.lock").exists()


def test_bad_training_params_are_refused_at_init(tmp_path: Path, tiny_data: Path) -> None:
    """An unknown optimiser (or one without its step count) never reaches a train stage: exit 4, nothing written."""
    for settings, words in (({"adapters.train.optimizer": "sgd"}, ["adapters.train", "sgd", "lbfgs", "adam"]),
                            ({"adapters.train.iterations": 0}, ["adapters.train", "iterations=0"])):
        fresh = tmp_path / str(len(list(tmp_path.iterdir())))
        fresh.mkdir()
        result = legonet(*init_args(tiny_data, settings), cwd=fresh, check=False)
        message = " ".join(result.stderr.split())
        assert result.returncode == 4 and all(w in message for w in words), message
        assert list(fresh.iterdir()) == []


def test_the_console_script_keeps_the_exit_codes_of_usage_errors(tmp_path: Path) -> None:
    """`legonet` ends with a fast exit (pipeline.cli.main.run); argparse's own exits keep their codes through it."""
    assert legonet("--help", cwd=tmp_path, check=False).returncode == 0
    bad = legonet("no-such-command", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    assert legonet("forget", str(tmp_path / "missing.json"), cwd=tmp_path, check=False).returncode == 4  # no project
