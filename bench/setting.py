"""What a benchmark run is set to (modes, grids, params) and where it runs (machine, versions, code digest)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pipeline.model.adapters import TrainParams, train_adapter

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "legonet-bench/1"


@dataclass
class Reduced:
    """A cheaper plan for a large dataset: which cells of the full specification run there (the rest is absent from
    the results, never filled in). Patterns are fnmatch patterns over system specs ("probe", "sisa:10",
    "legonet:100:3")."""

    grid: list[tuple[int, int]]  # LegoNet (n, k) cells
    all_seeds: list[str]  # systems that get every seed; the others run seed 0 only
    all_requests: list[str]  # systems that get every request size; the others only the first
    sequential_literal: int  # requests run literally; the rest by exactness (verified on the literal prefix)


BIG = Reduced(grid=[(n, k) for n in (16, 32, 256) for k in (1, 3)] + [(100, k) for k in (1, 2, 3, 5, 10)],
              all_seeds=["probe", "sisa:*", "legonet:100:1", "legonet:100:3", "legonet:100:10", "legonet:32:3"],
              all_requests=["probe", "sisa:*", "legonet:*:1", "legonet:*:3", "legonet:100:*"],
              sequential_literal=50)


@dataclass
class Config:
    """What one run measures. ``MODES`` holds the presets; the CLI can override single fields."""

    mode: str
    datasets: list[str]
    seeds: int
    n: list[int]
    k: list[int]
    sisa: list[int]
    request_sizes: list[int]
    sequential: int
    sequential_systems: list[str]  # "sisa:10", "legonet:100:3", "probe"
    project: bool
    project_overrides: dict[str, object] = field(default_factory=dict)
    project_request_sizes: list[int] = field(default_factory=lambda: [1, 100])
    # the dataset the project is initialised on (`legonet init --data`); its in-process run gives the compute floor.
    # "mnist5k" is the bundled default data, so that project is `legonet init` without --data.
    project_data: str = "mnist5k"
    image_size: int | None = None  # None: params.yaml's encoder.image_size
    request_seed: int = 20261127
    checkpoints: int = 5
    params_overrides: dict[str, object] = field(default_factory=dict)  # dotted params.yaml keys (smoke only)
    reduced: dict[str, Reduced] = field(default_factory=dict)  # dataset -> cheaper plan (absent: full spec)
    calibration_repeats: int = 2


_FULL = dict(datasets=["mnist5k", "fashion70k", "wordnet"], seeds=3, n=[16, 32, 100, 256], k=[1, 2, 3, 5, 10],
             sisa=[5, 10, 20, 16, 32, 100, 256], request_sizes=[1, 100], sequential=500,
             sequential_systems=["sisa:10", "legonet:100:3", "probe"], project=True)
MODES: dict[str, Config] = {
    # The specification of issue 5 on mnist5k; on the two large datasets the cheaper plan BIG (about 1/3 of the
    # training work; the full grid there is `--complete`, roughly 10 hours on 2 shared cores).
    "full": Config("full", **_FULL, reduced={"fashion70k": BIG, "wordnet": BIG}),
    "complete": Config("complete", **_FULL),
    "quick": Config("quick", ["mnist5k"], 1, [32], [1, 3], [10, 32], [1], 10, ["sisa:10", "legonet:32:3", "probe"],
                    True, {"adapters.n": 4, "data.partitions": 1}, [1], calibration_repeats=1),
    # the grid as a Reduced plan too, so the smoke test also runs the exactness shortcut of the sequential requests
    # System (4) too: a real project on the same 1,000 digits with the same params as the in-process systems, so
    # its forget is checked against the in-process retrain of the same adapters (the compute floor).
    "smoke": Config("smoke", ["mnist1k"], 1, [4, 8], [1, 2], [2, 4], [1, 20], 6, ["sisa:4", "legonet:8:2", "probe"],
                    True, {"adapters.n": 4, "adapters.k": 2, "adapters.blocks": 1, "data.partitions": 1,
                           "encoder.image_size": 32, "projection.dim": 32, "gate.min_accuracy": 0.5}, [1],
                    project_data="mnist1k",
                    image_size=32, checkpoints=1, params_overrides={"projection.dim": 32}, calibration_repeats=1,
                    reduced={"mnist1k": Reduced([(4, 1), (4, 2), (8, 1), (8, 2)], ["*"], ["*"], 3)}),
}


def load_params(overrides: dict[str, object] | None = None) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in (overrides or {}).items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"params.yaml has no key {dotted}")
        node[leaf] = value
    return params


def stats(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    return {"per_seed": [float(v) for v in arr], "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "min": float(arr.min()), "max": float(arr.max())}


def machine() -> dict:
    cpu = "unknown"
    flags: list[str] = []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in ("avx2", "avx512f", "fma") if f in line.split(":", 1)[1].split()]
    mem = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "cpu_isa": ",".join(flags), "mem_gib": mem,
            "platform": platform.platform(), "python": platform.python_version(), "hostname": platform.node()}


def commit() -> str:
    """The short commit of the checkout being measured."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "numpy", "onnxruntime", "onnx", "pandas", "pyarrow", "dvc", "mlflow", "safetensors",
                 "matplotlib", "tokenizers", "efficientnet-lite-pytorch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def code_digest(root: Path = REPO, patterns: tuple[str, ...] = ("bench/*.py", "pipeline/**/*.py")) -> str:
    """sha256 over the files under ``root`` that match ``patterns`` (sorted; by default bench/*.py and every module of
    pipeline/): the exact code of a run, committed or not."""
    digest = hashlib.sha256()
    files = {p for pattern in patterns for p in root.glob(pattern) if p.is_file() and "__pycache__" not in p.parts}
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def warm_up(params: TrainParams) -> None:
    """Import torch and run its first kernels before anything is timed (the pipeline's stages pay this per process;
    the calibration of the real project measures it separately)."""
    rng = np.random.default_rng(0)
    train_adapter(rng.normal(size=(64, 8)).astype(np.float32), rng.integers(0, 2, 64), 2, 0,
                  TrainParams(**{**asdict(params), "epochs": 2, "iterations": 2}))
