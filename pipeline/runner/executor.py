"""Where a stage's independent work runs: in the stage process (``executor: local``) or as Ray tasks (``ray``).

The executor chooses *where* work runs, never *what* it computes. The units are pure functions shared by both
executors, so the bytes are the same wherever they ran:

* ``train_task``: (shard features, labels, params, seed_j) -> safetensors bytes of adapter j;
* ``encode_task``: (encoder bytes, a fixed chunk of payloads) -> embeddings; the encoder is batch-invariant
  (docs/design.md section 8), so splitting a partition into chunks cannot change a sample's bits.

The stage still reads its inputs and writes its outputs itself, so DVC stays the source of truth and
``dvc.lock`` is the same for either executor. ``executor`` and ``ray`` are declared as params by no stage, and the
audit record's params digest leaves them out (``pipeline.project.params.params_digest``).

Ray is an optional extra, imported only when ``executor: ray``. A stage attaches to ``RAY_ADDRESS`` when it is
set (``legonet build`` and ``forget`` start one local Ray for the whole ``dvc repro`` and export it), else starts
a private local Ray with the machine's cores. Workers get ``MKL_CBWR=AVX2,STRICT`` and the stage's thread counts
through the job's ``runtime_env``, so training bits match the local run's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.errors import ExecutorError
from pipeline.model.adapters import TrainParams, adapter_bytes, train_adapter

EXECUTORS = ("local", "ray")
# Top-level params that choose where work runs; they must never change an artifact or a digest.
EXECUTION_KEYS = ("executor", "ray")
INSTALL_HINT = "pip install '.[ray]' (or pip install 'legonet[ray]'; Ray 2.60.0)"
DEFAULT_ENCODE_CHUNK = 1024


def executor_of(params: Mapping[str, Any]) -> str:
    name = str(params.get("executor", "local"))
    if name not in EXECUTORS:
        raise ExecutorError(f"params.yaml: executor {name!r} is not one of {', '.join(EXECUTORS)}")
    return name


def ray_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    section = params.get("ray") or {}
    chunk = int(section.get("encode_chunk", DEFAULT_ENCODE_CHUNK))
    if chunk < 1:
        raise ExecutorError(f"params.yaml: ray.encode_chunk={chunk} must be at least 1")
    return {"encode_chunk": chunk}


def import_ray() -> Any:
    try:
        import ray  # lazy: Ray is an optional extra (`pip install legonet[ray]`)
    except ImportError as exc:
        raise ExecutorError(f"executor: ray needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


def worker_env(threads: int) -> dict[str, str]:
    """Environment of every Ray worker: MKL's strict reproducibility mode and the local thread counts."""
    return {"MKL_CBWR": "AVX2,STRICT", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _ray_address() -> str | None:
    """``RAY_ADDRESS``, or None; an empty value is dropped so Ray itself does not read it either."""
    if os.environ.get("RAY_ADDRESS") == "":
        del os.environ["RAY_ADDRESS"]
    return os.environ.get("RAY_ADDRESS")


def connect(threads: int) -> Any:
    """Attach this process to Ray (``RAY_ADDRESS``, else a private local Ray with the machine's cores)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = _ray_address()
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "logging_level": logging.WARNING,
                               "runtime_env": {"env_vars": worker_env(threads)}}
    if address is None:
        options["num_cpus"] = os.cpu_count() or 1
    try:
        ray.init(address=address, **options)
    except ConnectionError as exc:
        raise ExecutorError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {exc}") from exc
    return ray


@contextlib.contextmanager
def cluster(params: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """For ``legonet build``/``forget``: one local Ray for the whole ``dvc repro``; yields env for the stages.

    With ``executor: local``, or when ``RAY_ADDRESS`` already names a cluster, there is nothing to start. The
    local Ray is started by this process (``ray.init``) in its own temporary folder and torn down with it:
    ``ray stop`` would kill every Ray on the machine, and ``ray start --block`` leaves processes behind on
    SIGTERM.
    """
    if executor_of(params) != "ray" or _ray_address():
        yield {}
        return
    ray = import_ray()
    temp = tempfile.mkdtemp(prefix="lgray")  # short: Ray's unix socket paths must fit in 107 bytes
    try:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _temp_dir=temp)
        address = ray.get_runtime_context().gcs_address
        yield {"RAY_ADDRESS": address}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _task_tags(started: float) -> tuple[dict[str, str], int, int]:
    tags = {"task.host": socket.gethostname(), "task.pid": str(os.getpid())}
    ray = sys.modules.get("ray")  # a Ray worker has imported it; importing it here would cost a second per process
    with contextlib.suppress(Exception):  # inside a Ray worker: where it ran
        if ray is not None and ray.is_initialized():
            context = ray.get_runtime_context()
            tags |= {"ray.node_id": context.get_node_id(), "ray.task_id": context.get_task_id() or ""}
    return tags, int(started * 1000), int(time.time() * 1000)


# -- the units of work: pure functions of their arguments ------------------------------------------------------

def train_task(adapter: int, features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int,
               train: Mapping[str, Any], salt: str | None) -> tuple[bytes, dict[str, Any]]:
    """Train adapter j; return its safetensors bytes (byte-stable: the only metadata is the data salt the stage
    computed) and a small lineage record."""
    started, clock = time.time(), time.monotonic()
    weights = train_adapter(features, labels, n_classes, seed, TrainParams(**train))
    blob = adapter_bytes(weights, salt)
    tags, start_ms, end_ms = _task_tags(started)
    return blob, {"name": f"adapter-{adapter:04d}", "start_ms": start_ms, "end_ms": end_ms,
                  "params": {"adapter": adapter, "seed": seed},
                  "metrics": {"train_samples": float(len(labels)), "task_seconds": time.monotonic() - clock},
                  "tags": tags}


_SESSIONS: dict[tuple[str, str, int, int], Any] = {}  # one ONNX Runtime session per worker process and encoder


def encode_task(chunk: int, model: bytes, digest: str, name: str, image_size: int, threads: int,
                payloads: Sequence) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed one chunk of payloads with the encoder given as ONNX bytes; return embeddings and lineage."""
    from pipeline.model.encoder import Encoder  # lazy: ONNX Runtime only in an encoding task

    started, clock = time.time(), time.monotonic()
    key = (digest, name, image_size, threads)
    if key not in _SESSIONS:
        _SESSIONS[key] = Encoder(name, model, image_size, threads=threads)
    embeddings = _SESSIONS[key].encode(payloads)
    tags, start_ms, end_ms = _task_tags(started)
    return embeddings, {"name": f"chunk-{chunk:04d}", "start_ms": start_ms, "end_ms": end_ms,
                        "params": {"chunk": chunk, "rows": len(payloads)},
                        "metrics": {"samples": float(len(payloads)), "task_seconds": time.monotonic() - clock},
                        "tags": tags}


# -- running many units ------------------------------------------------------------------------------------------

def run_train(params: Mapping[str, Any], jobs: Sequence[tuple], threads: int
              ) -> list[tuple[bytes, dict[str, Any]]]:
    """Run ``train_task(*job)`` for every job, in order of ``jobs``; with Ray as one task each."""
    if executor_of(params) == "local" or not jobs:
        return [train_task(*job) for job in jobs]
    ray = connect(threads)
    remote = ray.remote(num_cpus=threads, max_retries=2)(train_task)
    return ray.get([remote.remote(*job) for job in jobs])


def run_encode(params: Mapping[str, Any], encoder: Any, model: bytes, digest: str, payloads: Sequence,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Embed ``payloads``: locally with ``encoder``, or as Ray tasks over fixed chunks of ``ray.encode_chunk``.

    Returns the embeddings (row i for payload i) and, for Ray, one lineage record per chunk.
    """
    if executor_of(params) == "local":
        return encoder.encode(payloads, progress=progress), []
    size = ray_settings(params)["encode_chunk"]
    threads = int(params["encoder"]["threads"])
    ray = connect(threads)
    remote = ray.remote(num_cpus=threads, max_retries=2)(encode_task)
    model_ref = ray.put(model)
    image_size = int(getattr(encoder, "image_size", 0) or 0)
    pending = {remote.remote(i, model_ref, digest, encoder.name, image_size, threads,
                             list(payloads[start:start + size])): (i, start)
               for i, start in enumerate(range(0, len(payloads), size))}
    out = np.empty((len(payloads), encoder.dim), dtype=np.float32)
    records: list[dict[str, Any]] = [{}] * len(pending)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i, start = pending.pop(done[0])
        embeddings, record = ray.get(done[0])
        out[start:start + len(embeddings)] = embeddings
        records[i] = record
        if progress is not None:
            progress(len(embeddings))
    return out, records
