"""Projection and adapter keys, fitted on the non-deletable reference split only.

The paper draws keys from the training set; we do not, because deleting a key's seed sample would then move every
assignment. Here keys and projection are a pure function of (reference embeddings, params, seed), so no deletion can
ever change them.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import KeysError


def fit_projection(reference: np.ndarray, dim: int, standardise: bool = False) -> np.ndarray:
    """PCA of the reference embeddings: returns a (dim + 1, d) float32 array, row 0 the mean, rows 1.. the axes.

    ``dim = 0`` means no projection (an empty array), or with ``standardise`` the identity. ``standardise``
    (tabular data, encoder `none`: columns in unrelated units) divides each column by its standard deviation on the
    reference split before the PCA; the division is folded into the axes (x - mean) . (a / std), so ``project``
    is unchanged. A constant column keeps its scale. Signs are fixed (largest component positive) so the result
    does not depend on LAPACK's arbitrary sign choice.
    """
    if dim == 0 and not standardise:
        return np.zeros((0, reference.shape[1]), dtype=np.float32)
    if dim > min(reference.shape):
        raise KeysError(
            f"projection.dim={dim} needs at least {dim} reference samples and embedding width >= {dim}; "
            f"have {reference.shape[0]} samples of width {reference.shape[1]}"
        )
    data = reference.astype(np.float64)
    mean = data.mean(axis=0)
    std = data.std(axis=0) if standardise else np.ones(data.shape[1])
    scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0)
    if dim == 0:
        return np.vstack([mean[None, :], np.diag(scale)]).astype(np.float32)
    _, _, vt = np.linalg.svd((data - mean) * scale, full_matrices=False)
    axes = vt[:dim]
    signs = np.sign(axes[np.arange(dim), np.abs(axes).argmax(axis=1)])
    axes = axes * signs[:, None] * scale[None, :]
    return np.vstack([mean[None, :], axes]).astype(np.float32)


def project(embeddings: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Apply the projection row by row.

    A batched matmul may pick different BLAS kernels for a row depending on how many rows share the call, so the
    bits of one sample could change when another sample is deleted. A per-row elementwise product and reduction
    has one fixed summation order: a sample's projected bits depend on that sample alone.
    """
    if projection.shape[0] == 0:
        return np.ascontiguousarray(embeddings, dtype=np.float32)
    mean, axes = projection[0], projection[1:]
    centred = (embeddings.astype(np.float32) - mean)[:, None, :]
    out = np.empty((embeddings.shape[0], axes.shape[0]), dtype=np.float32)
    for start in range(0, embeddings.shape[0], 256):
        out[start : start + 256] = (centred[start : start + 256] * axes[None, :, :]).sum(axis=-1)
    return out


def fit_keys(reference: np.ndarray, n: int, seed: int, iterations: int) -> np.ndarray:
    """k-means keys (k-means++ start, Lloyd steps) on the projected reference split: (n, d) float32.

    Keys placed where the data lies spread the training samples over adapters; a seeded generator and a fixed
    number of iterations make the keys a pure function of (reference, n, seed).
    """
    if n < 1:
        raise KeysError(f"adapters.n must be at least 1, got {n}")
    if reference.shape[0] < n:
        raise KeysError(f"adapters.n={n} keys need at least {n} reference samples, have {reference.shape[0]}")
    data = reference.astype(np.float64)
    rng = np.random.default_rng(seed)
    centres = [data[rng.integers(data.shape[0])]]
    closest = ((data - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, n):
        probs = closest / closest.sum() if closest.sum() > 0 else np.full(len(data), 1 / len(data))
        centres.append(data[rng.choice(data.shape[0], p=probs)])
        closest = np.minimum(closest, ((data - centres[-1]) ** 2).sum(axis=1))
    keys = np.array(centres)
    for _ in range(iterations):
        nearest = squared_distances(data, keys).argmin(axis=1)
        for j in range(n):
            members = data[nearest == j]
            if len(members):
                keys[j] = members.mean(axis=0)
    return keys.astype(np.float32)


def squared_distances(points: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(N, n) squared L2 distances, computed elementwise per row so a row's result is batch-invariant."""
    out = np.empty((points.shape[0], keys.shape[0]), dtype=np.float64)
    for start in range(0, points.shape[0], 256):
        chunk = points[start : start + 256, None, :].astype(np.float64)
        out[start : start + 256] = ((chunk - keys[None, :, :].astype(np.float64)) ** 2).sum(axis=-1)
    return out
