"""Smoke test of the benchmark (issue 5): `python -m bench --smoke` runs every in-process system on 1,000 digits, and
system (4), a real project (CLI, DVC, MLflow) on the same digits, and writes a complete results file, report and
plots. Structure only: no timing or accuracy thresholds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_KEYS = {"system", "label", "heads", "params_per_head", "params_total", "rows_total", "empty_heads",
               "max_head_rows", "min_head_rows", "accuracy", "build_seconds", "expected_forget_1", "forget"}
FORGET_KEYS = {"request_samples", "heads_retrained", "samples_retrained", "params_retrained", "retrain_seconds",
               "accuracy_after"}


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    docs = out / "benchmarks.md"
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--results-dir", str(out), "--cache",
                             str(out / "cache"), "--docs", str(docs)], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "smoke.json").read_text()), out


def test_every_system_ran(smoke: tuple[dict, Path]) -> None:
    results, _ = smoke
    assert results["schema"] == "legonet-bench/1"
    for key in ("command", "started_at", "finished_at", "machine", "versions", "config", "params", "datasets",
                "wall_seconds", "load_average_start", "load_average_end", "git_revision"):
        assert key in results, key
    assert {"nproc", "cpu_model"} <= set(results["machine"])
    config = results["config"]
    assert list(results["datasets"]) == config["datasets"]
    for block in results["datasets"].values():
        assert {"info", "requests", "systems", "sequential_request_ids"} <= set(block)
        systems = block["systems"]
        kinds = [s["system"] for s in systems]
        assert kinds.count("probe") == 1
        assert sorted(s["s"] for s in systems if s["system"] == "sisa") == sorted(config["sisa"])
        grid = {(s["n"], s["k"]) for s in systems if s["system"] == "legonet"}
        assert grid == {(n, k) for n in config["n"] for k in config["k"] if k <= n}
        for entry in systems:
            assert set(entry) >= SYSTEM_KEYS, SYSTEM_KEYS - set(entry)
            assert len(entry["accuracy"]["per_seed"]) == config["seeds"]
            assert set(entry["forget"]) == {str(size) for size in config["request_sizes"]}
            for forget in entry["forget"].values():
                assert set(forget) >= FORGET_KEYS
                assert forget["heads_retrained"] >= 1
        sequential = [s for s in systems if s.get("sequential")]
        assert len(sequential) == len(config["sequential_systems"])
        for entry in sequential:
            assert entry["sequential"]["requests"] == config["sequential"]
            assert {"accuracy_before", "accuracy_after", "retrain_seconds_total", "curve"} <= set(entry["sequential"])
        literal = [e for e in sequential if e["system"] != "probe"]
        assert any("exactness_bit_identical" in e["sequential"] for e in literal)  # the exactness shortcut ran


def test_the_real_project_ran_and_matches_the_in_process_retrain(smoke: tuple[dict, Path]) -> None:
    """System (4): `dvc repro -f` and a `legonet forget` per request size, each with its time breakdown. The project
    holds the same digits and params as the in-process LegoNet, so the pipeline's forget must retrain the adapters
    the in-process routing picks and end at the same test accuracy (the compute floor is a like-for-like retrain)."""
    results, _ = smoke
    project, config = results["project"], results["config"]
    assert project["data"] == config["project_data"] and project["train_samples"] > 0
    assert project["repro_force"]["stages_run"] >= 1 and project["repro_force"]["seconds"] > 0
    assert set(project["forget"]) == {str(size) for size in config["project_request_sizes"]}
    for forget in project["forget"].values():
        assert forget["retrained_adapters"] and forget["wall_seconds"] > 0
        assert {"totals", "by_stage_kind", "stages"} <= set(forget["breakdown"])
        floor = forget["compute_floor"]
        assert floor["same_adapters_as_pipeline"] is True
        assert floor["same_accuracy_as_pipeline"] is True
        assert forget["speedup_vs_full_rebuild"] > 0


def test_every_figure_is_finite(smoke: tuple[dict, Path]) -> None:
    results, _ = smoke
    numbers = _numbers([results["datasets"], results["project"]])
    assert numbers and all(math.isfinite(x) for x in numbers)
    for block in results["datasets"].values():
        for entry in block["systems"]:
            assert 0.0 <= entry["accuracy"]["mean"] <= 1.0


def test_report_and_plots_written(smoke: tuple[dict, Path]) -> None:
    _, out = smoke
    text = (out / "benchmarks.md").read_text()
    assert "## How it was run" in text and "## Where we stand against the paper" in text
    assert "## System 4: the real pipeline (DVC + MLflow) on MNIST 1k" in text
    assert "python -m bench --smoke" in text
    for plot in ("accuracy-vs-forget-time", "k-sweep", "n-sweep"):
        path = out / f"smoke-{plot}.png"
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.name in text


def test_resume_reuses_finished_parts_unless_told_to_measure_them_again(tmp_path: Path) -> None:
    """`--resume` takes a finished part from the interrupted run; `--rerun` measures it again, and the project's
    dataset is measured again with the project (the project's compute floor needs its in-process systems)."""
    from dataclasses import asdict

    from bench.run import _previous, _reusable
    from bench.setting import MODES

    previous = {"datasets": {"mnist5k": {}, "fashion70k": {}}, "project": {"forget": {}},
                "phase_seconds": {"mnist5k": 1.0, "fashion70k": 1.0, "project": 1.0}}
    assert _reusable(previous, "mnist5k", [], "mnist5k") and _reusable(previous, "fashion70k", ["project"], "mnist5k")
    assert not _reusable(previous, "wordnet", [], "mnist5k")  # never finished
    assert not _reusable(previous, "fashion70k", ["fashion70k"], "mnist5k")
    assert not _reusable(previous, "project", ["project"], "mnist5k")
    assert not _reusable(previous, "mnist5k", ["project"], "mnist5k")
    assert not _reusable(None, "mnist5k", [], "mnist5k")

    # A run recorded before a config field existed resumes when the field holds its default, and not otherwise.
    config = json.loads(json.dumps(asdict(MODES["full"])))
    out = {"config": config, "params": {"adapters": {"n": 32}}, "versions": {"torch": "2.13.0"}}
    old = {**out, "config": {k: v for k, v in config.items() if k != "project_data"}, "started_at": "then"}
    (tmp_path / "full.json").write_text(json.dumps(old))
    assert _previous(tmp_path, "full", out) == old
    assert _previous(tmp_path, "full", {**out, "config": {**config, "project_data": "mnist1k"}}) is None
    assert _previous(tmp_path, "full", {**out, "params": {"adapters": {"n": 64}}}) is None


def test_the_copies_of_a_scale_dataset_have_new_ids_and_with_pixel_new_payloads() -> None:
    import pandas as pd

    from bench.scale import copies

    frame = pd.DataFrame({"sample_id": ["a", "b"], "label": [0, 1], "image": [b"\x00\x01\x02", b"\x09\x08\x07"]})
    exact, changed = copies(frame, 3, False), copies(frame, 3, True)
    assert exact["sample_id"].tolist() == ["a-c0", "b-c0", "a-c1", "b-c1", "a-c2", "b-c2"]
    assert exact["image"].tolist() == frame["image"].tolist() * 3
    assert changed["image"].nunique() == 6 and changed["image"].iloc[:2].tolist() == frame["image"].tolist()
    assert changed["label"].tolist() == [0, 1] * 3
