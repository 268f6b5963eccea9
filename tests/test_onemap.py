"""One map of the pipeline (issue 25): what a forget reruns, in which order, which stages run in the stage worker
and the build's progress total all come from DVC's own graph of dvc.yaml and the .dvc files.

* the plan of a request is the set of stages downstream (in DVC's graph) of the raw partitions and the test split
  it rewrites, with the train blocks narrowed to those of the adapters its samples activate, in a topological
  order of that graph with the quality checkpoint right after `assign`;
* the paths the forget may change are the rewritten files and the outputs of the planned stages (shards and
  adapters only those of the activated adapters);
* a stage added to dvc.yaml downstream of the data is in the next forget's plan (the exactness fixture of
  tests/test_forget.py runs one through two forgets and compares its output with a fresh build's).

Runtime: the session's `built_project`, read only (no forget runs here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from conftest import copy_project
from dvc.repo import Repo

from pipeline.audit.record import Forgotten
from pipeline.data.dataset import read_table, write_table
from pipeline.forget import flow
from pipeline.project.layout import ROUTING, block_of
from pipeline.project.params import load_params
from pipeline.runner.build import address, stage_total
from pipeline.runner.worker import worker_modules
from pipeline.tracking.lineage import file_md5


def plan_for(root: Path, sample_ids: list[str]) -> tuple[flow.Plan, Any]:
    """The forget's plan of ``sample_ids``, and DVC's stage graph of the project (built separately)."""
    params = load_params(root)
    plan = flow.plan_batch(root, sample_ids, set(), lambda ids: {}, int(params["adapters"]["n"]),
                           int(params["adapters"]["blocks"]))
    with Repo(str(root)) as repo:
        plan = flow.rebuild_plan(plan, repo.index, worker_modules(root))
    with Repo(str(root)) as repo:
        graph = nx.relabel_nodes(repo.index.graph, lambda stage: address(stage, root))  # -> the stages it reads
    return plan, graph


def downstream(graph: Any, outputs: dict[str, str], paths: set[str]) -> set[str]:
    """Every stage of ``graph`` downstream of the stages that output ``paths`` (``outputs``: path -> stage)."""
    return {stage for path in paths for stage in nx.ancestors(graph, outputs[path])}


def outputs_of(root: Path) -> dict[str, str]:
    """path -> the stage (or .dvc file) that outputs it."""
    with Repo(str(root)) as repo:
        return {Path(out.fs_path).relative_to(repo.root_dir).as_posix(): address(stage, root)
                for stage in repo.index.stages for out in stage.outs}


@pytest.fixture(scope="module")
def request_ids(built_project: Path) -> dict[str, list[str]]:
    routing = read_table(built_project / "data/routing.parquet").sort_values("sample_id")
    test = sorted(read_table(built_project / "data/test/test.parquet")["sample_id"])
    first = routing[routing["partition"] == routing["partition"].iloc[0]]
    return {"train-and-test": [first["sample_id"].iloc[0], test[0]], "test-only": [test[-1]]}


def test_the_plan_is_dvcs_graph_downstream_of_the_rewritten_files(built_project: Path,
                                                                  request_ids: dict[str, list[str]]) -> None:
    root = built_project
    params = load_params(root)
    n, blocks = int(params["adapters"]["n"]), int(params["adapters"]["blocks"])
    outputs = outputs_of(root)
    plan, graph = plan_for(root, request_ids["train-and-test"])
    assert len(plan.partitions) == 1 and plan.test_ids and plan.adapters
    rewritten = {f"data/raw/part-{plan.partitions[0]:04d}.parquet", "data/test/test.parquet"}
    assert set(plan.rewritten) == rewritten
    affected_blocks = {f"train@{block_of(j, n, blocks):04d}" for j in plan.adapters}
    expected = {s for s in downstream(graph, outputs, rewritten) if not s.startswith("train@") or s in affected_blocks}
    assert set(plan.stages) == expected and len(plan.stages) == len(expected)
    assert {"assign", "quality", "evaluate", "baseline", "package", "encode@test"} <= expected
    assert not {"encoder", "keys", "encode@reference"} & expected
    assert f"encode@part-{plan.partitions[0]:04d}" in expected and len([s for s in expected if "part-" in s]) == 1
    # a topological order of DVC's graph: a stage comes after every stage whose outputs it reads
    for i, stage in enumerate(plan.stages):
        assert not set(plan.stages[i + 1:]) & nx.descendants(graph, stage), (stage, plan.stages)
    # the worker's stages go first among those ready: the checkpoint right after assign, beside the training
    assert plan.stages[plan.stages.index("assign") + 1] == "quality"
    # the paths it may change: rewritten inputs, planned stages' outputs, shards and adapters of the activated only
    changes = set(plan.changes)
    assert rewritten | {"data/routing.parquet", "models/package", "reports/quality/result.json"} <= changes
    shards = {p for p in changes if p.startswith("data/shards/")}
    assert shards == {f"data/shards/block-{block_of(j, n, blocks):04d}/adapter-{j:04d}.parquet" for j in plan.adapters}
    assert not any(p.startswith("models/adapters/") and not p.endswith((".json", ".safetensors")) for p in changes)
    may_change = flow.expected_changes(plan)
    assert may_change("models/package/MLmodel") and may_change("data/encoded/test.parquet")
    assert not may_change("models/keys.npy") and not may_change("data/encoded/reference.parquet")

    test_only, _ = plan_for(root, request_ids["test-only"])
    assert test_only.stages[0] == "encode@test" and set(test_only.stages) == downstream(
        graph, outputs, {"data/test/test.parquet"})
    assert not {"assign", "quality"} & set(test_only.stages)
    assert not any(p.startswith(("data/shards", "models/adapters")) for p in test_only.changes)


def test_of_the_train_blocks_ready_together_the_largest_retraining_goes_first(built_project: Path,
                                                                              tmp_path: Path) -> None:
    """Samples whose adapters lie in both train blocks: both retrain, and the plan lists first the block whose
    changed shards hold more bytes (the longest-first rule that lets the two processes end closer together), not
    the first in dvc.yaml: a copy whose second block's shard is made the larger puts that block first."""
    root = copy_project(built_project, tmp_path / "project")
    params = load_params(root)
    n, blocks = int(params["adapters"]["n"]), int(params["adapters"]["blocks"])
    routing = read_table(root / "data/routing.parquet")
    chosen, covered = [], set()
    for sample_id, adapters in zip(routing["sample_id"], routing["adapters"], strict=True):
        touched = {block_of(int(j), n, blocks) for j in adapters}
        if not touched <= covered:
            chosen.append(sample_id)
            covered |= touched
    plan, _ = plan_for(root, chosen)
    shards = {block: [root / path for path in plan.known_changes if path.startswith(f"data/shards/block-{block:04d}/")]
              for block in range(blocks)}
    assert blocks == 2 and all(shards.values())
    size = {block: sum(path.stat().st_size for path in paths) for block, paths in shards.items()}
    with shards[1][0].open("ab") as grown:  # only the plan reads it here: its size decides, not its rows
        grown.write(bytes(size[0] - size[1] + 1) if size[0] >= size[1] else b"")
    plan, _ = plan_for(root, chosen)
    assert [stage for stage in plan.stages if stage.startswith("train@")] == ["train@0001", "train@0000"]


def test_the_worker_stages_and_the_progress_total_come_from_dvc_yaml(built_project: Path) -> None:
    """The stage worker runs the stages whose module declares a ``preload()``; the build's progress bar counts
    the stages DVC lists for dvc.yaml."""
    assert worker_modules(built_project) == {"stages.quality", "stages.package"}
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=built_project,
                            capture_output=True, text=True, check=True).stdout.split()
    assert stage_total(built_project) == len(listed) > 10


def test_a_stage_added_downstream_of_the_data_joins_the_plan(built_project: Path, tmp_path: Path,
                                                             request_ids: dict[str, list[str]]) -> None:
    """A stage of the user's own reading the evaluation metrics (before any build ran it): the next forget's plan
    runs it after `evaluate`, and may change its output; a stage upstream of the data (reading only the encoder)
    is not planned."""
    root = copy_project(built_project, tmp_path / "project")
    text = (root / "dvc.yaml").read_text()
    (root / "dvc.yaml").write_text(text + """
  summary:
    cmd: python summarize.py
    deps:
      - metrics/evaluate.json
    outs:
      - reports/summary.json
  encoder-size:
    cmd: python size.py
    deps:
      - models/encoder.onnx
    outs:
      - reports/encoder-size.txt
""")
    for request in request_ids.values():
        plan, _ = plan_for(root, request)
        assert "summary" in plan.stages and "encoder-size" not in plan.stages
        assert plan.stages.index("summary") > plan.stages.index("evaluate")
        assert "reports/summary.json" in plan.changes


def test_a_forgotten_sample_back_in_the_data_is_refused_before_anything_changes(built_project: Path) -> None:
    """The check the quality stage made from the audit log (an input dvc.yaml does not declare) is the plan's: a
    sample an earlier request forgot that is back in the training or test data stops the forget, naming it."""
    routing = sorted(read_table(built_project / "data/routing.parquet")["sample_id"])
    back, requested = routing[0], routing[1]
    params = load_params(built_project)
    n, blocks = int(params["adapters"]["n"]), int(params["adapters"]["blocks"])

    # what the audit log says of these IDs
    forgotten = Forgotten(lambda ids: {i: ["req-old"] for i in ids if i == back}, "log-with-req-old")

    with pytest.raises(flow.ForgetError, match=rf"request\(s\) req-old forgot are back in .*'{back}'"):
        flow.plan_batch(built_project, [requested], set(), forgotten, n, blocks)
    plan = flow.plan_batch(built_project, [requested, back], set(), forgotten, n, blocks)  # forgotten again
    assert plan.train_ids == sorted([requested, back]) and not plan.already_forgotten


def test_the_back_check_trusts_a_clean_mark_only_for_the_same_data_and_log(built_project: Path,
                                                                          tmp_path: Path) -> None:
    """A forget marks the state it leaves clean (``flow.mark_clean``), so the next plan need not hash every ID;
    the mark answers only for the routing index, test split and log it names: another of any is checked in full."""
    root = copy_project(built_project, tmp_path / "project")
    routing = read_table(root / ROUTING)
    back, requested, other = sorted(routing["sample_id"])[:3]
    params = load_params(root)
    n, blocks = int(params["adapters"]["n"]), int(params["adapters"]["blocks"])
    asked: list[str] = []

    def lookup(ids: Any) -> dict[str, list[str]]:
        asked.extend(ids)
        return {i: ["req-old"] for i in ids if i == back}

    digests = {p: file_md5(root / p) for p in ("data/routing.parquet", "data/test/test.parquet")}
    flow.mark_clean(root, "log-before-req-old", digests)  # a mark made before req-old was in the log
    with pytest.raises(flow.ForgetError, match="forgot are back"):
        flow.plan_batch(root, [requested], set(), Forgotten(lookup, "log-with-req-old"), n, blocks)
    assert len(asked) > len(routing)  # every training and test ID was looked up
    flow.mark_clean(root, "log-with-req-old", digests)  # (a test's mark: the data does hold `back`)
    asked.clear()
    plan = flow.plan_batch(root, [requested], set(), Forgotten(lookup, "log-with-req-old"), n, blocks)
    assert plan.train_ids == [requested] and len(asked) == 0  # trusted: nothing hashed
    write_table(routing[routing["sample_id"] != other].reset_index(drop=True), root / ROUTING)  # other data
    with pytest.raises(flow.ForgetError, match="forgot are back"):
        flow.plan_batch(root, [requested], set(), Forgotten(lookup, "log-with-req-old"), n, blocks)
