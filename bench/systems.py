"""The compared systems, on the same frozen projected features, trained with the pipeline's own functions.

* ``probe``: the pipeline's ridge probe on all train samples (``baseline`` params, ``pipeline.model.probe``); its exact
  unlearning is a full retrain.
* ``sisa``: s heads, each on a random shard (sample -> shard by a seeded hash of its sample_id), prediction = mean of
  the heads' probabilities (the paper's FixSISA on a frozen encoder).
* ``legonet``: n heads with keys from ``pipeline.model.keys.fit_keys`` on the reference split, samples routed to their k
  nearest keys by ``pipeline.model.routing.route`` / ``shard``, heads by ``pipeline.model.adapters.train_adapter`` with
  ``adapter_seed``, prediction by ``pipeline.model.ensemble.Ensemble``.

A head is a pure function of (its rows in sample_id order, params, seed), so the exact unlearning of a request is
retraining exactly the heads whose rows contain a forgotten sample, on their rows minus the forgotten ones.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.model.adapters import TrainParams, adapter_proba, adapter_seed, train_adapter
from pipeline.model.ensemble import Ensemble
from pipeline.model.probe import fit_probe, probe_statistics
from pipeline.model.routing import route, shard


@dataclass
class Features:
    """Projected features of one dataset (train rows sorted by sample_id, the order the pipeline's shards use)."""

    name: str
    n_classes: int
    train_ids: np.ndarray
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    reference_x: np.ndarray


@dataclass
class Request:
    """Rows (indices into the train arrays) a deletion request removes."""

    label: str
    rows: np.ndarray


class HeadSystem:
    """A set of heads, head j trained on ``rows[j]`` with ``seeds[j]``; subclasses say how to predict."""

    kind = "heads"

    def __init__(self, features: Features, rows: Sequence[np.ndarray], seeds: Sequence[int],
                 params: TrainParams | None, membership: np.ndarray):
        """``params``: the torch heads' training params; None for a subclass that fits its heads itself."""
        self.features = features
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.seeds = list(seeds)
        self.params = params
        self.membership = membership  # (N_train, m): the heads each train row is in (-1 = none)
        self.weights: dict[int, dict[str, np.ndarray]] = {}
        self.head_seconds: list[float] = []
        self.head_cpu: list[float] = []
        self.build_cpu = 0.0
        self.last_cpu = 0.0  # process CPU seconds of the last retrain() (torch runs on this one thread)

    def _train(self, j: int, alive: np.ndarray | None) -> dict[str, np.ndarray]:
        rows = self.rows[j] if alive is None else self.rows[j][alive[self.rows[j]]]
        f = self.features
        return train_adapter(f.train_x[rows], f.train_y[rows], f.n_classes, self.seeds[j], self.params)

    def build(self) -> float:
        """Train every head; per-head compute seconds are kept for the expected cost of a request."""
        started, cpu = time.perf_counter(), time.process_time()
        self.head_seconds, self.head_cpu = [], []
        for j in range(len(self.rows)):
            mark, mark_cpu = time.perf_counter(), time.process_time()
            self.weights[j] = self._train(j, None)
            self.head_seconds.append(time.perf_counter() - mark)
            self.head_cpu.append(time.process_time() - mark_cpu)
        self.build_cpu = time.process_time() - cpu
        return time.perf_counter() - started

    def expected_single(self) -> dict:
        """Mean cost of forgetting one uniformly random train sample: head j is hit with probability |S_j| / N
        (its share of the train set), so E[rows] = sum |S_j| (|S_j| - 1) / N and E[seconds] = sum |S_j| / N * t_j
        with t_j the head's measured training time. Less noisy than one random request, and what the paper's
        "mean time of one unlearning" means."""
        n = len(self.features.train_y)
        sizes = np.array([len(r) for r in self.rows], dtype=np.float64)
        share = sizes / n
        return {"heads": round(float(share.sum()), 3),
                "samples": round(float((share * np.maximum(sizes - 1, 0)).sum())),
                "params": round(float(sum(p * self.head_params(j) for j, p in enumerate(share)))),
                "seconds": round(float((share * np.array(self.head_seconds)).sum()), 4),
                "cpu_seconds": round(float((share * np.array(self.head_cpu)).sum()), 4)}

    def affected(self, rows: np.ndarray) -> list[int]:
        heads = self.membership[rows].reshape(-1)
        return sorted(int(j) for j in np.unique(heads[heads >= 0]))

    def retrain(self, heads: Sequence[int], alive: np.ndarray) -> tuple[dict[int, dict[str, np.ndarray]], float]:
        """Retrain ``heads`` on their rows still alive; returns the new weights and the compute seconds."""
        started, cpu = time.perf_counter(), time.process_time()
        new = {j: self._train(j, alive) for j in heads}
        self.last_cpu = time.process_time() - cpu
        return new, time.perf_counter() - started

    def rows_of(self, heads: Sequence[int], alive: np.ndarray) -> int:
        return int(sum(int(alive[self.rows[j]].sum()) for j in heads))

    def params_of(self, heads: Sequence[int]) -> int:
        return int(sum(self.head_params(j) for j in heads))

    def head_params(self, j: int) -> int:
        d, c, hidden = self.features.train_x.shape[1], self.features.n_classes, self.params.hidden
        return (d + 1) * hidden + (hidden + 1) * c if hidden else (d + 1) * c

    def proba(self, weights: dict[int, dict[str, np.ndarray]], x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def accuracy(self, weights: dict[int, dict[str, np.ndarray]] | None = None) -> float:
        f = self.features
        proba = self.proba(self.weights if weights is None else weights, f.test_x)
        return float((proba.argmax(axis=1) == f.test_y).mean())

    def describe(self) -> dict:
        sizes = [len(r) for r in self.rows]
        return {"heads": len(self.rows), "params_per_head": self.head_params(0),
                "params_total": self.params_of(range(len(self.rows))), "rows_total": int(sum(sizes)),
                "empty_heads": int(sum(s == 0 for s in sizes)), "max_head_rows": int(max(sizes)),
                "min_head_rows": int(min(sizes))}


class Probe(HeadSystem):
    """The pipeline's `baseline` probe: ridge regression on one-hot labels over all train rows, in closed form
    (``pipeline.model.probe``); seed-free, so every seed gives the same head."""

    kind = "probe"

    def __init__(self, features: Features, ridge: float, seed: int):
        n = len(features.train_y)
        super().__init__(features, [np.arange(n)], [adapter_seed(seed, -1)], None, np.zeros((n, 1), np.int64))
        self.ridge = ridge

    def _train(self, j: int, alive: np.ndarray | None) -> dict[str, np.ndarray]:
        rows = self.rows[j] if alive is None else self.rows[j][alive[self.rows[j]]]
        f = self.features
        return {"ridge": fit_probe([probe_statistics(f.train_x[rows], f.train_y[rows], f.n_classes)], self.ridge)}

    def head_params(self, j: int) -> int:
        return (self.features.train_x.shape[1] + 1) * self.features.n_classes

    def proba(self, weights, x):
        """Class scores (not probabilities): only their argmax is used."""
        w = weights[0]["ridge"]
        return x.astype(np.float64) @ w[:-1] + w[-1]


class Sisa(HeadSystem):
    kind = "sisa"

    def __init__(self, features: Features, params: TrainParams, seed: int, s: int):
        assignment = np.array([sisa_shard(sid, s, seed) for sid in features.train_ids], dtype=np.int64)
        rows = [np.flatnonzero(assignment == j) for j in range(s)]  # train rows are in sample_id order
        super().__init__(features, rows, [adapter_seed(seed, j) for j in range(s)], params, assignment[:, None])
        self.s = s

    def proba(self, weights, x):
        used = [w for _, w in sorted(weights.items()) if w]
        return np.mean([adapter_proba(w, x) for w in used], axis=0)


def sisa_shard(sample_id: str, s: int, seed: int) -> int:
    """FixSISA's random assignment, as a stable function of the sample alone (so deletion moves nothing else)."""
    digest = hashlib.sha256(f"legonet-bench-sisa:{seed}:{s}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % s


class LegoNet(HeadSystem):
    kind = "legonet"

    def __init__(self, features: Features, params: TrainParams, seed: int, keys: np.ndarray, k: int,
                 nearest: np.ndarray):
        """``nearest`` is ``route(train_x, keys, k_max)``; its first k columns are ``route(train_x, keys, k)``
        (a stable argsort of the same distances), so one routing pass serves the whole k sweep."""
        n = keys.shape[0]
        assignment = np.ascontiguousarray(nearest[:, :k])
        frame = pd.DataFrame({"sample_id": features.train_ids, "row": np.arange(len(features.train_ids))})
        rows = [part["row"].to_numpy() for part in shard(frame, assignment, n)]
        super().__init__(features, rows, [adapter_seed(seed, j) for j in range(n)], params, assignment)
        self.keys, self.k = keys, k

    def ensemble(self, weights: dict[int, dict[str, np.ndarray]]) -> Ensemble:
        # Features are projected already: an empty projection makes Ensemble's project() the identity.
        empty = np.zeros((0, self.keys.shape[1]), dtype=np.float32)
        return Ensemble(empty, self.keys, weights, self.k, list(range(self.features.n_classes)))

    def proba(self, weights, x):
        return self.ensemble(weights).predict_proba(x)[0]


def nearest_keys(features: Features, keys: np.ndarray, k_max: int) -> np.ndarray:
    return route(features.train_x, keys, min(k_max, keys.shape[0]))


def forget_once(system: HeadSystem, request: Request, baseline_seconds: float | None) -> dict:
    """Exact unlearning of one request, measured: retrain exactly the affected heads (compute only)."""
    alive = np.ones(len(system.features.train_y), dtype=bool)
    alive[request.rows] = False
    heads = system.affected(request.rows)
    new, seconds = system.retrain(heads, alive)
    merged = {**system.weights, **new}
    out = {"request_samples": len(request.rows), "heads_retrained": len(heads),
           "samples_retrained": system.rows_of(heads, alive), "params_retrained": system.params_of(heads),
           "retrain_seconds": round(seconds, 4), "retrain_cpu_seconds": round(system.last_cpu, 4),
           "accuracy_after": system.accuracy(merged)}
    if baseline_seconds is not None:
        out["speedup_vs_probe"] = round(baseline_seconds / seconds, 3) if seconds > 0 else None
    return out


def sequential(system: HeadSystem, rows: np.ndarray, checkpoints: int, say: Callable[[str], None],
               literal: int | None = None) -> dict:
    """Forget ``rows`` one request at a time, each retraining only the heads it touches.

    With ``literal`` < len(rows), only the first ``literal`` requests run one by one (timed). The rest use
    exactness: a head's weights are a pure function of its rows, so after the last request every head equals one
    training on its final rows; that is computed once (after checking, on the literal prefix, that retraining every
    touched head on its current rows gives bit-identical weights), and the remaining requests' heads and rows are
    counted exactly while their compute is estimated from the heads' measured training times (scaled by rows).
    """
    literal = len(rows) if literal is None else min(literal, len(rows))
    alive = np.ones(len(system.features.train_y), dtype=bool)
    weights = dict(system.weights)
    before = system.accuracy(weights)
    curve = [[0, before]]
    total, cpu, heads_total, samples_total = 0.0, 0.0, 0, 0
    touched: set[int] = set()
    every = max(1, literal // max(1, checkpoints))
    started = time.perf_counter()
    for i, row in enumerate(rows[:literal], start=1):
        alive[row] = False
        heads = system.affected(np.array([row]))
        new, seconds = system.retrain(heads, alive)
        weights.update(new)
        touched.update(heads)
        total += seconds
        cpu += system.last_cpu
        heads_total += len(heads)
        samples_total += system.rows_of(heads, alive)
        if i % every == 0 or i == literal:
            curve.append([i, system.accuracy(weights)])
            say(f"      {i}/{len(rows)} requests: accuracy {curve[-1][1]:.4f}, retrain {total:.1f} s "
                f"(wall {time.perf_counter() - started:.0f} s)")
    out = {"requests": len(rows), "literal_requests": literal, "accuracy_before": before,
           "retrain_seconds_literal": round(total, 3), "retrain_cpu_seconds_literal": round(cpu, 3),
           "retrain_seconds_mean_literal": round(total / max(1, literal), 4)}
    if literal < len(rows):
        check, _ = system.retrain(sorted(touched), alive)
        out["exactness_checked_heads"] = len(check)
        out["exactness_bit_identical"] = all(
            set(check[j]) == set(weights[j]) and all(np.array_equal(check[j][n], weights[j][n]) for n in check[j])
            for j in check)
        estimate, sizes = 0.0, [max(1, len(r)) for r in system.rows]
        for row in rows[literal:]:
            alive[row] = False
            heads = system.affected(np.array([row]))
            heads_total += len(heads)
            counts = [int(alive[system.rows[j]].sum()) for j in heads]
            samples_total += sum(counts)
            estimate += sum(system.head_seconds[j] * c / sizes[j] for j, c in zip(heads, counts, strict=True))
        final = system.affected(rows)
        new, seconds = system.retrain(final, alive)
        weights.update(new)
        curve.append([len(rows), system.accuracy(weights)])
        out.update({"final_state_heads_retrained_once": len(final), "final_state_retrain_seconds": round(seconds, 3),
                    "retrain_seconds_estimated_rest": round(estimate, 3)})
        total += estimate
        say(f"      {len(rows)}/{len(rows)} requests (exact final state, {len(final)} heads retrained once; "
            f"prefix bit-identical: {out['exactness_bit_identical']}): accuracy {curve[-1][1]:.4f}")
    out.update({"accuracy_after": curve[-1][1], "curve": curve, "retrain_seconds_total": round(total, 3),
                "retrain_seconds_mean": round(total / len(rows), 4), "heads_retrained_total": heads_total,
                "samples_retrained_total": samples_total})
    return out
