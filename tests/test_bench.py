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


def test_a_table_point_pools_the_images_and_grows_against_its_own_modality() -> None:
    import numpy as np
    import pandas as pd

    from bench.scale import pooled, verdicts

    image = np.arange(784, dtype=np.uint8).reshape(28, 28)
    table = pooled(pd.DataFrame({"sample_id": ["a"], "label": [3], "image": [image.tobytes()]}))
    assert table.columns.tolist() == ["sample_id", "label", *[f"p{i:02d}" for i in range(49)]]
    assert table["p08"].iloc[0] == image[4:8, 4:8].mean() and table["label"].iloc[0] == 3

    def row(data: str, modality: str, samples: int, non_training: float) -> dict:
        return {"data": data, "modality": modality, "samples": samples, "n": 32, "build_seconds": 100.0,
                "forget_seconds": non_training + 1, "forget_batch_seconds": 10.0,
                "forget_non_training_seconds": non_training}

    growth = verdicts([row("table5k", "table", 5000, 2.0), row("mnist5k", "image", 5000, 8.0),
                       row("fashion280k", "image", 280000, 12.0), row("table1m", "table", 10**6, 5.0)])
    assert {d: g["non_training_growth"] for d, g in growth["data_axis"]["n=32"].items()} == \
        {"mnist5k": 1.0, "fashion280k": 1.5, "table5k": 1.0, "table1m": 2.5}


def test_the_soak_names_the_phases_that_grew_between_its_first_and_last_requests() -> None:
    from bench.soak import WINDOW, phase_growth

    forgets = [{"phases": {"plan": 1.0, "purge": 0.1 + 0.01 * i, f"repro:train@{i % 3}": 2.0}} for i in range(60)]
    growth = phase_growth(forgets)
    assert list(growth) == ["purge", "plan"], "a phase only some requests ran is left out; the grown one first"
    assert growth["purge"] == [round(0.1 + 0.01 * (WINDOW - 1) / 2, 3), round(0.1 + 0.01 * (119 - WINDOW) / 2, 3)]
    assert growth["plan"] == [1.0, 1.0]


def _forget(data: str, code: str, samples: int, seconds: float, train: float, plan: float) -> dict:
    return {"data": data, "code": code, "samples": samples, "seconds": seconds, "non_training_seconds": seconds - train,
            "phases": {"plan": plan, "repro:train@1": train / 2, "repro:train@2": train / 2}}


def test_compare_summary_ratios_of_medians_and_the_phase_that_grew(tmp_path: Path) -> None:
    """bench.compare: head/base is the ratio of the medians over the rounds, a `foreach`'s stages are summed, the
    phase that grew leads the growth list, and a head slower by more than 10 % is flagged in the report."""
    from bench.compare import report, summarize

    records = [_forget("mnist5k", "base", 1, s, 2.0, 0.8) for s in (10.0, 12.0, 11.0)]
    records += [_forget("mnist5k", "head", 1, s, 2.0, 2.0) for s in (13.0, 30.0, 12.5)]
    records += [_forget("mnist5k", code, 100, 40.0, 20.0, 1.0) for code in ("base", "head")]
    one, batch = summarize(records)
    assert (one["base"]["seconds"], one["head"]["seconds"], one["ratio"]) == (11.0, 13.0, round(13 / 11, 3))
    assert one["non_training_ratio"] == round(11 / 9, 3) and not one["within_tolerance"]
    assert one["base"]["phases"] == {"plan": 0.8, "repro:train@*": 2.0}
    assert one["phase_growth_seconds"][0] == ("plan", 1.2)
    assert batch["samples"] == 100 and batch["ratio"] == 1.0 and batch["within_tolerance"]

    code = {"revision": "abc", "source_sha256": "00", "cli": "-m pipeline.cli.main"}
    build = {"build_seconds": 100.0}
    lines = report({"command": "python -m bench.compare --base abc", "date": "today", "machine": {"nproc": 2},
                    "load_average_before": [0.1], "load_average_after": [0.2], "codes": {"base": code, "head": code},
                    "builds": {"base/mnist5k": build, "head/mnist5k": build}, "rows": [one, batch]})
    assert "| mnist5k | 1 | 11.00 | 13.00 | 1.182 | 9.00, 11.00, 1.222 | no |" in lines
    assert "| mnist5k | 100 | 40.00 | 40.00 | 1.000 | 20.00, 20.00, 1.000 | yes |" in lines
    assert "| plan | 0.80 → 2.00 | 1.00 → 1.00 |" in lines


def test_compare_runs_each_code_s_own_cli_and_reuses_only_what_the_same_code_built(tmp_path: Path) -> None:
    from bench.compare import code_cli, reusable
    from bench.scale import settings

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages/cli.py").write_text("")
    old = code_cli(tmp_path)
    assert old("build")[1:] == ["-m", "stages.cli", "build"] and old.env["PYTHONPATH"] == str(tmp_path)
    assert code_cli(REPO).prefix[1:] == ("-m", "pipeline.cli.main")
    with pytest.raises(SystemExit, match="no legonet CLI"):
        code_cli(tmp_path / "stages")

    code = {"revision": "abc", "source_sha256": "00"}
    recorded = {"code": code, "samples": 5000, "settings": settings(5000, 32, 32, {})}
    assert reusable(recorded, {**code, "revision": "def"}, 32, 32)  # a commit that changes only bench/
    assert not reusable(recorded, {**code, "source_sha256": "01"}, 32, 32)
    assert not reusable(recorded, code, 16, 32)
    assert not reusable({}, code, 32, 32)
