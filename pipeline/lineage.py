"""Lineage: every stage run becomes an MLflow run with its params, input and output digests and code revision.

Digests are DVC's own (md5 of file bytes, the value ``dvc.lock`` records), so an auditor can join an MLflow run to
``dvc.lock`` and to the DVC cache without either side storing the data. Only digests and small metadata are logged
here, never samples.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def file_md5(path: Path) -> str:
    """md5 of a file's bytes, as DVC records it for a file output."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_digests(paths: Sequence[Path], root: Path) -> dict[str, str]:
    """md5 of every file under the given files or directories, keyed by path relative to ``root``, sorted."""
    found: dict[str, str] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            found[file.relative_to(root).as_posix()] = file_md5(file)
    return dict(sorted(found.items()))


def git_revision(root: Path) -> str:
    """The code revision of the checkout that holds the ``pipeline`` package, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def platform_tags() -> dict[str, str]:
    """Library versions and CPU: the bit-exactness oracle holds per platform (DESIGN.md section 8)."""
    import numpy
    import onnxruntime

    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                flags = ",".join(f for f in ("avx2", "avx512f", "fma") if f in present)
                break
    return {
        "platform.machine": platform.machine(),
        "platform.cpu_isa": flags or "unknown",
        "platform.python": platform.python_version(),
        "platform.numpy": numpy.__version__,
        "platform.onnxruntime": onnxruntime.__version__,
    }


def configure(tracking_uri: str, experiment: str, project: Path) -> None:
    """Point MLflow at the project's store; create the experiment with its artifact root inside the project."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = (project / "mlartifacts").resolve().as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:
            pass  # created by a concurrent process between the lookup and the create
    mlflow.set_experiment(experiment)


@contextmanager
def stage_run(
    stage: str,
    project: Path,
    mlflow_params: Mapping[str, Any],
    params: Mapping[str, Any],
    inputs: Sequence[Path],
    outputs: Sequence[Path],
    tags: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Wrap one stage execution in an MLflow run.

    Inputs are logged as MLflow datasets (name = path, digest = md5) before the body runs; outputs' digests are
    logged as tags after it succeeds. The yielded dict collects metrics the body wants logged.
    """
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    configure(mlflow_params["tracking_uri"], mlflow_params["experiment"], project)
    started = time.monotonic()
    collected: dict[str, Any] = {}
    with mlflow.start_run(run_name=stage) as run:
        mlflow.set_tags({"legonet.stage": stage, "legonet.code_revision": git_revision(_code_root()),
                         **platform_tags(), **(tags or {})})
        mlflow.log_params(_flatten(params))
        for name, digest in tree_digests(list(inputs), project).items():
            source = LocalArtifactDatasetSource(name)
            mlflow.log_input(MetaDataset(source=source, name=name, digest=digest), context="input")
        yield collected
        outs = tree_digests([p for p in outputs if p.exists()], project)
        mlflow.set_tags({f"out.{name}": digest for name, digest in outs.items()})
        metrics = {k: float(v) for k, v in collected.items() if isinstance(v, int | float)}
        metrics["stage_seconds"] = time.monotonic() - started
        mlflow.log_metrics(metrics)
        collected["run_id"] = run.info.run_id


def _code_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
