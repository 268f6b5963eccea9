"""The LegoNet ensemble: route an embedding to its k nearest trained adapters and average their softmax outputs."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from pipeline.model.adapters import adapter_proba
from pipeline.model.keys import project
from pipeline.model.routing import route
from pipeline.project.layout import adapter_index


def mean_proba(activated: np.ndarray, n_classes: int, outputs: Callable[[int, np.ndarray], np.ndarray]
               ) -> np.ndarray:
    """The ensemble's probabilities (N, C) from the adapters each row activates (N, k'): ``outputs(j, rows)``
    gives adapter j's softmax outputs for those rows. Summed in adapter order in float64, then averaged; an
    adapter's output for a row depends on that row alone, so outputs kept from an earlier run give the same bits
    (the `evaluate` stage scores again only the rows of retrained adapters)."""
    proba = np.zeros((activated.shape[0], n_classes), dtype=np.float64)
    for j in np.unique(activated):
        rows = np.flatnonzero((activated == j).any(axis=1))
        proba[rows] += outputs(int(j), rows)
    return (proba / activated.shape[1]).astype(np.float32)


class Ensemble:
    """Projection + keys + adapters: everything after the encoder that decides a prediction.

    ``adapters[j]`` is the weight dict of adapter j, empty when its shard had no samples (never consulted).
    """

    def __init__(self, projection: np.ndarray, keys: np.ndarray, adapters: Mapping[int, dict[str, np.ndarray]],
                 k: int, classes: list[int]):
        self.projection = projection
        self.keys = keys
        self.adapters = adapters
        self.k = k
        self.classes = classes
        self.usable = np.array([bool(adapters.get(j)) for j in range(keys.shape[0])])

    def predict_proba(self, embeddings: np.ndarray, quarantine: Collection[int] = ()
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Mean probabilities (N, C) and the adapters consulted (N, k') for encoder embeddings (N, d).

        ``quarantine``: adapters never consulted (their shards held a sample a pending request forgets); each
        sample takes its next nearest usable adapters instead, so the answer is a function of the embedding,
        the kept adapters and the quarantine alone."""
        points = project(embeddings, self.projection)
        activated = route(points, self.keys, self.k, self.allowed(quarantine))
        return mean_proba(activated, len(self.classes),
                          lambda j, rows: adapter_proba(self.adapters[j], points[rows])), activated

    def allowed(self, quarantine: Collection[int]) -> np.ndarray:
        """The usable adapters outside ``quarantine``; an error names what is wrong with the quarantine."""
        n = self.keys.shape[0]
        outside = sorted(int(j) for j in quarantine if not 0 <= int(j) < n)
        if outside:
            raise ValueError(f"quarantine names adapter(s) {outside[:5]}, but the model has adapters 0..{n - 1}")
        mask = self.usable.copy()
        mask[[int(j) for j in quarantine]] = False
        if not mask.any():
            raise ValueError(f"the quarantine {sorted(set(quarantine))[:10]} leaves no trained adapter to consult; "
                             "retrain (`legonet requests run`) before predicting")
        return mask

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        proba, _ = self.predict_proba(embeddings)
        return np.asarray(self.classes)[proba.argmax(axis=1)]


def load_ensemble(projection: Path, keys: Path, adapters: Path, k: int, classes: list[int]) -> Ensemble:
    """Read an ensemble from its artifact files (the same files DVC tracks and the package copies)."""
    key_array = np.load(keys)
    weights = {adapter_index(p): load_file(p) for p in adapters.rglob("adapter-*.safetensors")}
    missing = sorted(set(range(key_array.shape[0])) - set(weights))
    if missing:
        raise FileNotFoundError(f"{adapters}: no weights for adapter(s) {missing[:5]}; run `dvc repro`")
    return Ensemble(np.load(projection), key_array, weights, k, classes)
