"""`legonet build`: `dvc repro` with a progress bar, then tag the registered version with its `dvc.lock` digest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import executor
from pipeline.layout import METRICS, block_count
from stages.project import load_params, sync_generated

RUNNING = re.compile(r"^Running stage '([^']+)'")


class BuildError(RuntimeError):
    """`dvc repro` failed; the message carries the failing stage and DVC's own output."""


def repro(root: Path, targets: list[str] | None = None, force: bool = False,
          console: Console | None = None, timings: dict[str, float] | None = None) -> list[str]:
    """Run `dvc repro` in ``root``, streaming a progress bar; return the stages DVC actually ran, in order.

    ``timings`` (if given) receives the wall time of each stage, DVC's own bookkeeping included.
    """
    console = console or Console(stderr=True)
    if sync_generated(root):
        console.print("params.yaml: regenerated the encode/adapter lists from data.partitions and adapters.n")
    total = _stage_count(root)
    cmd = [sys.executable, "-m", "dvc", "repro", *(["-f"] if force else []), *(targets or [])]
    ran: list[str] = []
    lines: list[str] = []
    # executor: ray -> one local Ray for every stage of this repro (unless RAY_ADDRESS names a cluster)
    with executor.cluster(load_params(root)) as ray_env, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                     TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("dvc repro", total=total)
        process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **ray_env})
        assert process.stdout is not None
        mark = time.monotonic()
        for line in process.stdout:
            lines.append(line)
            match = RUNNING.match(line)
            if match:
                if ran and timings is not None:
                    timings[f"repro:{ran[-1]}"] = round(time.monotonic() - mark, 3)
                mark = time.monotonic()
                ran.append(match.group(1))
                progress.update(task, completed=len(ran) - 1, description=f"stage {match.group(1)}")
        process.wait()
        if ran and timings is not None:
            timings[f"repro:{ran[-1]}"] = round(time.monotonic() - mark, 3)
    if process.returncode != 0:
        failing = ran[-1] if ran else "(before any stage)"
        raise BuildError(f"dvc repro failed in stage {failing}:\n{''.join(lines[-40:])}")
    return ran


def _stage_count(root: Path) -> int:
    params = load_params(root)
    blocks = block_count(int(params["adapters"]["n"]), int(params["adapters"]["blocks"]))
    return 7 + int(params["data"]["partitions"]) + 2 + blocks  # encoder keys assign quality baseline evaluate package


def dvc_lock_digest(root: Path) -> str:
    return hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()


def tag_build(root: Path) -> dict[str, str]:
    """Link the newest registered version to this build: the sha256 of dvc.lock and the project path."""
    from mlflow import MlflowClient

    from pipeline.lineage import configure, flush
    from pipeline.registry import latest_version

    params = load_params(root)
    configure(params["mlflow"]["tracking_uri"], params["mlflow"]["experiment"], root)
    flush(root, params["mlflow"])  # lineage of stages that ran without reaching `package`
    latest = latest_version(params["mlflow"]["registered_model"])
    if latest is None:
        return {}
    version = MlflowClient().get_model_version(latest.name, latest.version)  # search results carry no aliases
    tags = {"dvc_lock_sha256": dvc_lock_digest(root), "project": str(root.resolve())}
    for key, value in tags.items():
        MlflowClient().set_model_version_tag(version.name, version.version, key, value)
    aliases = ",".join(version.aliases) if version.aliases else ""
    return {"version": version.version, "aliases": aliases, "gate_reason": version.tags.get("gate_reason", ""),
            **tags}


def summary(root: Path) -> dict[str, float]:
    """Metrics of the last build, as `dvc metrics show` reads them."""
    out: dict[str, float] = {}
    for name in ("evaluate.json", "baseline.json"):
        path = root / METRICS / name
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out
