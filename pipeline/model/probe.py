"""The reference linear probe: ridge regression of one-hot labels on the projected features, in closed form.

The probe is a figure to compare the ensemble with (the frozen encoder's linear ceiling), not part of the model.
It is solved from sufficient statistics (the Gram matrix of the features with a bias column, their products with
the one-hot labels, the row count) that add up over any split of the rows. Each adapter shard's statistics are
a pure function of that shard, summed in adapter order, so a forget recomputes only the statistics of the shards
it changed and the probe is bit-identical to one fitted from scratch (docs/design.md section 4, cost
rule). Sums run in float64 through ``np.einsum``'s own loops, not BLAS, so their order never depends on the
thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STATISTICS = ("gram", "cross", "count")


def probe_statistics(features: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Sufficient statistics of one block of rows: features (N, d), labels as class indices (N,)."""
    x = np.hstack([features.astype(np.float64), np.ones((len(features), 1))])
    onehot = np.zeros((len(features), n_classes))
    onehot[np.arange(len(features)), labels] = 1.0
    return {"gram": np.einsum("ni,nj->ij", x, x, optimize=False),
            "cross": np.einsum("ni,nc->ic", x, onehot, optimize=False),
            "count": np.array([len(features)], dtype=np.int64)}


def fit_probe(statistics: Sequence[dict[str, np.ndarray]], ridge: float) -> np.ndarray:
    """Weights (d + 1, C), the last row the bias, from the statistics of every block summed in the given order.

    ``ridge`` is the penalty per training row (the bias is not penalised), so the same value suits any data size.
    """
    gram = np.zeros_like(statistics[0]["gram"])
    cross = np.zeros_like(statistics[0]["cross"])
    count = 0
    for block in statistics:
        gram += block["gram"]
        cross += block["cross"]
        count += int(block["count"][0])
    penalty = np.full(len(gram), ridge * max(count, 1))
    penalty[-1] = 0.0
    return np.linalg.solve(gram + np.diag(penalty), cross)


def probe_predict(weights: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Class index per row; per-row products (``np.einsum``'s loops), so a row's score depends on it alone."""
    x = features.astype(np.float64)
    scores = np.einsum("ni,ic->nc", x, weights[:-1], optimize=False) + weights[-1]
    return scores.argmax(axis=1)
