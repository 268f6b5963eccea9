"""The Great Expectations quality gate (issue 4), for real (DVC + GX + MLflow + headless Chromium).

* a clean build passes the checkpoint, writes the result and Data Docs under reports/, and a second `dvc repro`
  does not rerun `quality`;
* the Data Docs open in headless Chromium and show the suites' results;
* a forget that leaves an adapter below `quality.min_samples` and a class with no samples fails the checkpoint:
  the data is removed, the new version stays `candidate`, `champion` does not move, the CLI and the audit record
  say which expectations failed, and `quality` ran exactly once.

Runtime: the session's `built_project` plus one clone that is rebuilt (quality + package, ~20 s) and forgets ~90
samples (every adapter retrained, ~60 s).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_project, legonet
from test_forget import record, write_manifest

from pipeline.data.dataset import read_table
from pipeline.data.quality import samples_by_id, samples_of_routing, tables

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SUITES = ("training_data", "training_classes", "adapters")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_clean_build_passes_the_checkpoint_and_is_not_rerun(built_project: Path) -> None:
    result = json.loads((built_project / "reports/quality/result.json").read_text())
    assert result["success"] is True and result["failed"] == []
    assert [v["suite"] for v in result["checkpoint"]["validation_results"]] == list(SUITES)
    assert all(v["statistics"]["evaluated_expectations"] > 0 for v in result["checkpoint"]["validation_results"])
    index = (built_project / "reports/quality/data_docs/index.html").read_text()
    assert all(suite in index for suite in SUITES)
    for table in ("samples", "classes", "adapters"):
        columns = read_table(built_project / f"reports/quality/tables/{table}.parquet").columns
        assert "sample_id" not in columns, "reports must never hold a sample ID (residue once it is forgotten)"
    lock = yaml.safe_load((built_project / "dvc.lock").read_text())["stages"]
    assert "reports/quality/result.json" in [d["path"] for d in lock["package"]["deps"]]

    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=built_project, capture_output=True, text=True)
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout

    from mlflow import MlflowClient

    uri = f"sqlite:///{built_project / 'mlflow.db'}"
    version = MlflowClient(uri, uri).get_model_version_by_alias("legonet", "champion")
    assert version.tags["quality"] == "passed"
    assert version.tags["quality_result_sha256"] == sha256(built_project / "reports/quality/result.json")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (CI: apt-get install -y chromium)")
def test_data_docs_render_in_headless_chromium(built_project: Path, tmp_path: Path) -> None:
    docs = built_project / "reports/quality/data_docs"
    pages = sorted((docs / "validations" / "adapters").rglob("*.html"))
    assert len(pages) == 1, pages
    html = pages[0].read_text()
    assert "Expectation Suite:" in html and ">adapters<" in html and "Succeeded" in html
    for suite in SUITES:
        assert (docs / "expectations" / f"{suite}.html").is_file()
    shots = {}
    for name, page in (("index", docs / "index.html"), ("adapters", pages[0])):
        shot = tmp_path / f"{name}.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=False)
        shots[name] = shot
    for name, shot in shots.items():
        assert shot.is_file(), f"chromium wrote no screenshot of {name}"
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 15_000, f"{name}: {len(data)} bytes: a blank page?"
    assert len(shots["adapters"].read_bytes()) > 50_000, "the validation page shows a table of results"


@pytest.fixture(scope="module")
def held_back(tmp_path_factory: pytest.TempPathFactory, built_project: Path) -> dict:
    """A clone with quality.min_samples just under its smallest adapter (rebuilt: passes, champion = version 2),
    then one forget of every train sample of one class plus enough of the smallest adapter's samples."""
    work = tmp_path_factory.mktemp("quality")
    root = copy_project(built_project, work / "project")
    routing = read_table(root / "data/routing.parquet")
    members: dict[int, set[str]] = {}
    for sid, adapters in zip(routing["sample_id"], routing["adapters"], strict=True):
        for j in adapters:
            members.setdefault(int(j), set()).add(sid)
    smallest = min(members, key=lambda j: (len(members[j]), j))
    min_samples = len(members[smallest]) - 5
    params = root / "params.yaml"
    text = params.read_text()
    text = text.replace("  min_samples: 1 ", f"  min_samples: {min_samples} ", 1)
    text = text.replace("retention_days: 0 ", "retention_days: 1 ", 1)  # keep the old champion to compare
    assert f"min_samples: {min_samples}" in text and "retention_days: 1" in text
    params.write_text(text)
    build = legonet("build", cwd=root)
    assert "aliases [champion]" in build.stdout, build.stdout

    shards = [read_table(p) for p in sorted((root / "data/shards").rglob("*.parquet"))]
    labels = {sid: int(label) for s in shards for sid, label in zip(s["sample_id"], s["label"], strict=True)}
    rarest = min(sorted(set(labels.values())), key=lambda c: sum(v == c for v in labels.values()))
    gone = {sid for sid, label in labels.items() if label == rarest}
    left = sorted(members[smallest] - gone)
    gone |= set(left[:len(left) - min_samples + 1])  # the smallest adapter ends one below min_samples
    manifest = write_manifest(work / "m.json", "req-quality", sorted(gone))
    result = legonet("forget", str(manifest), cwd=root)
    return {"root": root, "ids": gone, "class": rarest, "adapter": smallest, "result": result,
            "summary": json.loads(result.stdout.strip().splitlines()[-1]), "record": record(root, "req-quality")}


def test_a_forget_that_breaks_the_checkpoint_holds_promotion(held_back: dict) -> None:
    root, summary, predicate = held_back["root"], held_back["summary"], held_back["record"]
    # the request is honoured
    assert summary["status"] == "forgotten"
    assert not set(read_table(root / "data/routing.parquet")["sample_id"]) & held_back["ids"]
    # the checkpoint failed, naming the adapter and the class
    result = json.loads((root / "reports/quality/result.json").read_text())
    assert result["success"] is False
    failed = " | ".join(result["failed"])
    assert "adapters: expect_column_values_to_be_between(column=samples" in failed
    assert f"failing adapters [{held_back['adapter']}]" in failed, failed
    assert f"failing classes [{held_back['class']}]" in failed, failed
    # promotion held: candidate, champion unchanged, and the CLI says why
    assert summary["aliases"] == ["candidate"] and summary["gate"] == "failed"
    assert "quality checkpoint failed: adapters" in summary["gate_reason"], summary["gate_reason"]
    said = " ".join(held_back["result"].stderr.split())
    assert "@candidate" in said and "quality checkpoint failed" in said and "training_classes" in said, said
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    assert str(client.get_model_version_by_alias("legonet", "champion").version) == "2"
    candidate = client.get_model_version_by_alias("legonet", "candidate")
    assert str(candidate.version) == str(summary["model_version"]) == "3"
    # the audit record links the checkpoint result of the build it produced and says it failed
    quality = predicate["quality"]
    assert quality["passed"] is False and quality["failed_expectations"] == result["failed"]  # opened by the key
    assert quality["result_sha256"] == sha256(root / "reports/quality/result.json")
    assert predicate["registry"]["aliases"] == ["candidate"] and predicate["registry"]["quality"] == "failed"
    # `quality` ran exactly once in the forget, and is not rerun afterwards
    assert predicate["stages_run"].count("quality") == 1
    assert legonet("audit", "verify", cwd=root).returncode == 0
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, capture_output=True, text=True)
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout


def _shard(ids: list[str], labels: list, norms: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": ids, "label": labels, "norm": norms})


@pytest.mark.parametrize("labels", [[3, 7, 3, 7], ["cat", "dog", "cat", "dog"]], ids=["int", "str"])
def test_the_samples_table_by_routing_position_is_the_one_grouping_by_id_gives(labels: list) -> None:
    """The quality stage's look-up of each shard row in the routing index (``samples_of_routing``) gives the table
    grouping by ID gives, types included; on any input `assign` would not write it declines, and the grouping
    (which takes any input) decides."""
    a, b, c, d = labels
    shards = [_shard(["s03", "s01", "s07"], [b, a, c], [0.5, 1.5, 2.5]),
              _shard(["s01", "s09"], [a, d], [1.5, 3.0]),
              _shard(["s03", "s07", "s09"], [b, c, d], [0.5, 2.5, 3.0])]
    every = pd.concat(shards, ignore_index=True)
    routed = np.array(["s01", "s03", "s07", "s09"], dtype=object)
    found = samples_of_routing(every, routed)
    assert found is not None and found["shards"].tolist() == [2, 2, 2, 2]
    pd.testing.assert_frame_equal(found, samples_by_id(every, routed))
    broken = {"an ID in a shard but not in the index": (every, routed[1:]),
              "an ID in the index but in no shard": (every, np.append(routed, "s10")),
              "an index out of order": (every, routed[::-1].copy()),
              "an ID twice in the index": (every, np.insert(routed, 1, "s01")),
              "no sample": (every.iloc[:0], routed[:0])}
    for case, (rows, ids) in broken.items():
        assert samples_of_routing(rows, ids) is None, case
    for rows, ids in [(every, routed), *broken.values()]:
        expected = samples_by_id(rows, ids)
        if pd.api.types.is_numeric_dtype(expected["label"]):
            expected["label"] = expected["label"].astype("Int64")
        split = [rows.iloc[:3], rows.iloc[3:]]
        pd.testing.assert_frame_equal(tables(split, ids, [a, b])["samples"],
                                      expected[["label", "shards", "in_routing", "norm"]])
