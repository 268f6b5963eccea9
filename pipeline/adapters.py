"""One adapter: a small head trained only on the samples that activate it.

Training is a pure function of (shard, params, seed_j): the shard arrives sorted by sample_id, the seed is derived
from the global seed and the adapter index, minibatch order comes from a private generator, and MKL's conditional
bitwise reproducibility is pinned so the thread count cannot change the weights (DESIGN.md section 8).
Inference is plain numpy so serving and evaluation never pay for importing torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of every adapter (``adapters.train`` in params.yaml)."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    hidden: int  # 0: a linear layer; > 0: one hidden ReLU layer of this width
    threads: int


def adapter_seed(global_seed: int, index: int) -> int:
    """seed_j: a 63-bit seed from sha256(global seed, j), so adapters never share a random stream."""
    digest = hashlib.sha256(f"legonet-adapter:{global_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def train_adapter(
    features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int, params: TrainParams
) -> dict[str, np.ndarray]:
    """Train one head with Adam on softmax cross-entropy; returns its weights as float32 arrays.

    An empty shard returns an empty dict: that adapter is never consulted.
    """
    if features.shape[0] == 0:
        return {}
    os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")  # must precede torch's first matmul
    import torch

    torch.set_num_threads(params.threads)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.array(features, dtype=np.float32))  # a writable copy
    y = torch.from_numpy(labels.astype(np.int64))
    if params.hidden:
        model = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], params.hidden), torch.nn.ReLU(), torch.nn.Linear(params.hidden, n_classes)
        )
    else:
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], n_classes))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                bound = 1.0 / layer.in_features**0.5
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                layer.bias.zero_()
    optimiser = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(params.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], params.batch_size):
            batch = order[start : start + params.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x[batch]), y[batch]).backward()
            optimiser.step()
    weights = {}
    for i, layer in enumerate(layer for layer in model if isinstance(layer, torch.nn.Linear)):
        weights[f"layer{i}.weight"] = layer.weight.detach().numpy().astype(np.float32)
        weights[f"layer{i}.bias"] = layer.bias.detach().numpy().astype(np.float32)
    return weights


def _dense(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x @ weight.T + bias, elementwise per row so one row's output never depends on the others in the batch."""
    out = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
    for start in range(0, x.shape[0], 128):
        out[start : start + 128] = (x[start : start + 128, None, :] * weight[None, :, :]).sum(axis=-1) + bias
    return out


def adapter_proba(weights: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Softmax probabilities (N, C) of one trained adapter."""
    layers = sorted({name.split(".")[0] for name in weights})
    x = features.astype(np.float32)
    for i, layer in enumerate(layers):
        x = _dense(x, weights[f"{layer}.weight"], weights[f"{layer}.bias"])
        if i < len(layers) - 1:
            x = np.maximum(x, 0)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)
