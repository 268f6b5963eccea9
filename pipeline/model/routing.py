"""Top-k activation: which adapters a sample trains and which it consults.

A sample's adapters depend on that sample alone (its embedding and the fixed keys), so deleting one sample never
moves another. Ties break by adapter index (stable sort).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.model.keys import squared_distances


def route(points: np.ndarray, keys: np.ndarray, k: int, usable: np.ndarray | None = None) -> np.ndarray:
    """Indices (N, k) of the k nearest keys of each point, nearest first.

    ``usable`` (bool per adapter) restricts the choice at inference: an adapter without training samples is
    never consulted; the next nearest takes its place.
    """
    n = keys.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"adapters.k={k} must be between 1 and adapters.n={n}")
    distances = squared_distances(points, keys)
    if usable is not None:
        if not usable.any():
            raise ValueError("no adapter has training samples: the ensemble cannot predict")
        distances[:, ~usable] = np.inf
        k = min(k, int(usable.sum()))
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def shard(frame: pd.DataFrame, assignment: np.ndarray, n: int) -> list[pd.DataFrame]:
    """Rows of ``frame`` per adapter, each sorted by sample_id (the canonical order training reads)."""
    order = frame["sample_id"].to_numpy()
    shards = []
    for j in range(n):
        rows = np.flatnonzero((assignment == j).any(axis=1))
        part = frame.iloc[rows]
        shards.append(part.iloc[np.argsort(order[rows], kind="stable")].reset_index(drop=True))
    return shards


def routing_index(rows: pd.DataFrame, assignment: np.ndarray) -> pd.DataFrame:
    """The index forget reads: sample_id -> its raw partition and its k adapters, sorted by sample_id; with the
    label and payload digest (``rows``' other columns) each sample was routed with."""
    frame = pd.DataFrame({"sample_id": rows["sample_id"].to_numpy(),
                          "partition": rows["partition"].to_numpy().astype(np.int32)})
    frame["adapters"] = [row.astype(np.int32) for row in assignment]
    labels = rows["label"].to_numpy()  # class indices, or class names when data.classes names them
    frame["label"] = labels.astype(np.int64) if np.issubdtype(labels.dtype, np.integer) else labels
    frame["payload_sha256"] = rows["payload_sha256"].to_numpy()
    return frame.sort_values("sample_id", kind="stable").reset_index(drop=True)


def routing_changes(previous: pd.DataFrame, current: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(which rows of the previous index still hold, which rows of ``current`` must be routed).

    Both tables have sample_id, partition, label and payload_sha256; a row holds when all four are unchanged
    (routing is per sample, so its adapters are then what routing it again would give).
    """
    columns = ["sample_id", "partition", "label", "payload_sha256"]
    before = list(zip(*(previous[c].tolist() for c in columns), strict=True))
    now = list(zip(*(current[c].tolist() for c in columns), strict=True))
    wanted, had = set(now), set(before)
    return (np.array([row in wanted for row in before], dtype=bool),
            np.array([row not in had for row in now], dtype=bool))
