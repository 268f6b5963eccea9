"""System (4): a real legonet project driven through its CLI, DVC and MLflow, as a user runs it.

``legonet init`` on the default data with default params in a temporary folder, ``dvc repro -f`` (the pipeline's
"retrain from scratch", timed per stage), then ``legonet forget --profile`` of 1 and of 100 random train samples.
Where each forget's wall time goes comes from the audit record's ``timings_seconds`` (per phase and per DVC stage),
the MLflow run of each stage (``stage_seconds``: the time inside the stage body), and a calibration of the process
start-up and imports of each stage's command.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.data.dataset import write_table

RUNNING = re.compile(r"^Running stage '([^']+)'")
PROFILE_LINE = re.compile(r"^\s*(\S+)\s+([0-9.]+) s$")


class ProjectError(RuntimeError):
    """A step of the real-project benchmark failed; the message carries the command's output."""


def children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process tree so far (all waited-for descendants)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(cmd: list[str], cwd: Path, what: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise ProjectError(f"{what}: `{' '.join(cmd)}` exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result, seconds


def legonet(*args: str, cwd: Path, what: str) -> tuple[subprocess.CompletedProcess[str], float]:
    return _run([sys.executable, "-m", "pipeline.cli.main", *args], cwd, what)


def repro_force(root: Path, say: Callable[[str], None]) -> dict:
    """`dvc repro -f`, streamed: wall time of each stage (DVC's bookkeeping included) and of the whole."""
    started, cpu = time.perf_counter(), children_cpu()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f"], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    stages: dict[str, float] = {}
    lines: list[str] = []
    current, mark = None, started
    for line in process.stdout:
        lines.append(line)
        match = RUNNING.match(line)
        if match:
            now = time.perf_counter()
            if current is not None:
                stages[current] = round(now - mark, 3)
            current, mark = match.group(1), now
            if len(stages) % 10 == 0:
                say(f"    dvc repro -f: stage {len(stages) + 1} ({current}) at {now - started:.0f} s")
    process.wait()
    end = time.perf_counter()
    if current is not None:
        stages[current] = round(end - mark, 3)
    if process.returncode != 0:
        raise ProjectError(f"dvc repro -f exited {process.returncode}:\n{''.join(lines[-40:])}")
    return {"seconds": round(end - started, 3), "cpu_seconds": round(children_cpu() - cpu, 3),
            "stages_run": len(stages),
            "before_first_stage_seconds": round(end - started - sum(stages.values()), 3), "stage_seconds": stages}


def _stage_modules(root: Path) -> dict[str, str]:
    """Stage name (as DVC reports it, without @item) -> the Python module its cmd runs, read from dvc.yaml."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    out = {}
    for name, stage in spec.get("stages", {}).items():
        cmd = stage.get("cmd") or stage.get("do", {}).get("cmd", "")
        match = re.search(r"-m\s+([\w.]+)", cmd)
        if match:
            out[name] = match.group(1)
    return out


def calibrate(root: Path, repeats: int = 2) -> dict:
    """Process start-up + imports of each stage's command (``python -c 'import MODULE'``), of ``import torch`` (paid
    inside a train stage's body, on the first matmul) and of DVC's own CLI start-up, each the best of ``repeats``."""

    def best(cmd: list[str]) -> float:
        times = []
        for _ in range(repeats):
            _, seconds = _run(cmd, root, "calibration")
            times.append(seconds)
        return round(min(times), 3)

    out = {"python_startup": best([sys.executable, "-c", "pass"]),
           "import_torch": best([sys.executable, "-c", "import torch"]),
           "dvc_version_cli": best([sys.executable, "-m", "dvc", "--version"]),
           "import_mlflow": best([sys.executable, "-c", "import mlflow"])}
    out["stage_imports"] = {stage: best([sys.executable, "-c", f"import {module}"])
                            for stage, module in sorted(_stage_modules(root).items())}
    out["legonet_cli_imports"] = best([sys.executable, "-c", "import pipeline.cli.main, pipeline.forget.steps"])
    out["repeats"] = repeats
    return out


def _stage_runs(root: Path, since_ms: int) -> dict[str, float]:
    """stage -> ``stage_seconds`` of the MLflow runs logged since ``since_ms`` (the body of each stage process)."""
    from mlflow import MlflowClient

    params = yaml.safe_load((root / "params.yaml").read_text())
    uri = params["mlflow"]["tracking_uri"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(root / uri.removeprefix('sqlite:///')).resolve()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(params["mlflow"]["experiment"])
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.start_time >= {since_ms}",
                              max_results=10000)
    return {r.info.run_name: round(float(r.data.metrics["stage_seconds"]), 3) for r in runs
            if "stage_seconds" in r.data.metrics}


def _manifest(root: Path, request_id: str, sample_ids: list[str]) -> Path:
    path = root / f"{request_id}.json"
    path.write_text(json.dumps({"request_id": request_id, "sample_ids": sample_ids, "reason": "benchmark (issue 5)",
                                "received_at": datetime.now(UTC).isoformat(timespec="seconds")}, indent=1))
    return path


def forget(root: Path, request_id: str, sample_ids: list[str], calibration: dict) -> dict:
    """`legonet forget --profile` of one manifest; its wall time and where it went."""
    manifest = _manifest(root, request_id, sample_ids)
    since_ms, cpu = int(time.time() * 1000), children_cpu()
    result, wall = legonet("forget", manifest.name, "--profile", cwd=root, what=f"forget {request_id}")
    cpu = children_cpu() - cpu
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    shown, _ = legonet("audit", "show", request_id, cwd=root, what="audit show")
    record = json.loads(shown.stdout)["predicate"]
    timings = {k: float(v) for k, v in record["timings_seconds"].items()}
    # The record is written inside the audit phase, so its own duration and the commit's after it are only in the
    # --profile printout.
    for line in lines[:-1]:
        match = PROFILE_LINE.match(line)
        if match and match.group(1) not in timings:
            timings[match.group(1)] = float(match.group(2))
    bodies = _stage_runs(root, since_ms)
    return {"request_id": request_id, "samples": len(sample_ids), "wall_seconds": round(wall, 3),
            "cpu_seconds": round(cpu, 3),
            "summary": summary, "timings_seconds": timings, "stages_run": record.get("stages_run", []),
            "stage_body_seconds": bodies, "retrained_adapters": record["affected"]["adapters"],
            "breakdown": breakdown(wall, timings, bodies, calibration)}


def breakdown(wall: float, timings: dict[str, float], bodies: dict[str, float], calibration: dict) -> dict:
    """Split a forget's wall time into: CLI start-up, forget phases, and inside `dvc repro` for each stage
    its body (MLflow ``stage_seconds``), its process start-up + imports (calibrated) and DVC's own share (the rest)."""
    phases = {k: v for k, v in timings.items() if not k.startswith("repro:")}
    stages = {k.removeprefix("repro:"): v for k, v in timings.items() if k.startswith("repro:")}
    imports = calibration.get("stage_imports", {})
    stage_rows = {}
    for stage, seconds in stages.items():
        body = bodies.get(stage, 0.0)
        startup = min(imports.get(stage.split("@")[0], 0.0), max(0.0, seconds - body))
        stage_rows[stage] = {"wall": seconds, "body": body, "startup_imports": round(startup, 3),
                             "dvc": round(max(0.0, seconds - body - startup), 3)}
    rebuild = phases.get("rebuild", 0.0)
    in_stages = sum(stages.values())
    totals = {
        "cli_startup_and_unaccounted": round(wall - sum(phases.values()), 3),
        "validate_and_lock": round(phases.get("validate", 0.0) + phases.get("lock", 0.0), 3),
        "quarantine_mlflow": phases.get("quarantine", 0.0),
        "remove_rows_and_dvc_add": phases.get("remove", 0.0),
        "repro_stage_bodies": round(sum(r["body"] for r in stage_rows.values()), 3),
        "repro_stage_startup_imports": round(sum(r["startup_imports"] for r in stage_rows.values()), 3),
        "repro_dvc_per_stage": round(sum(r["dvc"] for r in stage_rows.values()), 3),
        "repro_dvc_outside_stages_and_checks": round(rebuild - in_stages, 3),
        "register_mlflow": phases.get("register", 0.0),
        "purge_dvc_and_mlflow": phases.get("purge", 0.0),
        "audit_sign_and_git": round(phases.get("audit", 0.0) + phases.get("commit", 0.0), 3),
    }
    by_kind: dict[str, dict[str, float]] = {}
    for stage, row in stage_rows.items():
        kind = by_kind.setdefault(stage.split("@")[0], {"count": 0, "wall": 0.0, "body": 0.0,
                                                          "startup_imports": 0.0, "dvc": 0.0})
        kind["count"] += 1
        for key in ("wall", "body", "startup_imports", "dvc"):
            kind[key] = round(kind[key] + row[key], 3)
    return {"totals": totals, "by_stage_kind": by_kind, "stages": stage_rows}


def run_project(workdir: Path | None, request_sizes: list[int], seed: int, say: Callable[[str], None],
                keep: bool = False, init_args: list[str] | None = None, calibration_repeats: int = 2,
                data: pd.DataFrame | None = None) -> dict:
    """Init a project (on ``data``, else the bundled default data), rebuild it from scratch, forget requests of each
    size in turn; all timed."""
    base = Path(tempfile.mkdtemp(prefix="legonet-bench-", dir=workdir))
    root = base / "project"
    try:
        args = [*(init_args or [])]
        if data is not None:
            samples = base / "samples.parquet"
            write_table(data, samples)
            args = ["--data", str(samples), *args]
        say(f"  project: legonet init {root} {' '.join(args)}".rstrip())
        _, init_seconds = legonet("init", str(root), *args, cwd=base, what="init")
        params = yaml.safe_load((root / "params.yaml").read_text())
        say("  project: dvc repro -f (the full pipeline rebuild, i.e. retrain from scratch)")
        repro = repro_force(root, say)
        say(f"  project: dvc repro -f took {repro['seconds']:.1f} s for {repro['stages_run']} stages")
        accuracy = json.loads((root / "metrics/evaluate.json").read_text())["accuracy"]
        calibration = calibrate(root, calibration_repeats)
        train_ids = sorted(pd.concat([pd.read_parquet(p, columns=["sample_id"])
                                      for p in sorted((root / "data/raw").glob("*.parquet"))])["sample_id"])
        rng = np.random.default_rng(seed)
        order = [train_ids[i] for i in rng.permutation(len(train_ids))]
        forgets, start = {}, 0
        for size in request_sizes:
            ids = sorted(order[start:start + size])
            start += size
            say(f"  project: legonet forget --profile ({size} sample(s))")
            forgets[str(size)] = forget(root, f"bench-{size}", ids, calibration)
            forgets[str(size)]["sample_ids"] = ids
            forgets[str(size)]["accuracy_after"] = json.loads((root / "metrics/evaluate.json").read_text())[
                "accuracy"]
            say(f"    wall {forgets[str(size)]['wall_seconds']:.1f} s, adapters "
                f"{forgets[str(size)]['retrained_adapters']}")
        return {"root": str(root) if keep else None, "init_seconds": round(init_seconds, 3),
                "params": {"adapters.n": params["adapters"]["n"], "adapters.k": params["adapters"]["k"],
                           "data.partitions": params["data"]["partitions"],
                           "encoder.image_size": params["encoder"]["image_size"],
                           "adapters.train": params["adapters"]["train"]},
                "repro_force": repro, "accuracy_after_repro": accuracy,
                "calibration": calibration, "forget": forgets, "train_samples": len(train_ids)}
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
