"""One adapter: a small head trained only on the samples that activate it.

Training is a pure function of (shard, params, seed_j): the shard arrives sorted by sample_id, the seed is derived
from the global seed and the adapter index, and MKL's conditional bitwise reproducibility is pinned so the thread
count cannot change the weights (docs/design.md section 8).

Two optimisers minimise the same objective, mean softmax cross-entropy + weight_decay / 2 * ||params||^2:

* ``lbfgs`` (the default): full-batch L-BFGS with a backtracking Armijo line search, in float64 with hand-written
  gradients. There is no minibatch order, so the result depends on the seed only through the initial weights; it
  stops at a gradient tolerance or after ``iterations`` steps, both pure functions of the bits. Every sum over the
  rows is a matrix product (MKL, bitwise reproducible for any thread count); no ``torch.optim`` and no autograd,
  so the stage process never imports ``torch._dynamo`` (seconds per process, pulled in by ``Optimizer.step`` and
  ``use_deterministic_algorithms``). On a convex linear head it reaches the optimum in tens of full passes, where
  Adam needs many epochs of minibatches (docs/adapter-training.md).
* ``adam``: minibatch Adam for ``epochs`` passes in a seeded order. It is what a params file without
  ``optimizer`` gets, so projects built before the key existed keep their bits.

Inference is plain numpy so serving and evaluation never pay for importing torch.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import save

from pipeline.data.salt import SALT_KEY

OPTIMIZERS = ("lbfgs", "adam")
HISTORY = 10  # L-BFGS curvature pairs kept
GRADIENT_TOLERANCE = 1e-6  # L-BFGS stops when no gradient entry is larger (float64)
ARMIJO = 1e-4  # sufficient-decrease constant of the line search
MAX_HALVINGS = 40  # line-search step halvings before L-BFGS gives up (the step cannot decrease the objective)


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of every adapter (``adapters.train`` in params.yaml)."""

    weight_decay: float
    hidden: int = 0  # 0: a linear layer; > 0: one hidden ReLU layer of this width
    threads: int = 1
    optimizer: str = "adam"  # a params file from before the key trained with Adam: keep its bits
    iterations: int = 0  # lbfgs: most L-BFGS steps
    epochs: int = 0  # adam: passes over the shard
    lr: float = 0.0  # adam: step size
    batch_size: int = 0  # adam: rows per step

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        needed = {"lbfgs": ("iterations",), "adam": ("epochs", "lr", "batch_size")}[self.optimizer]
        for name in (*needed, "threads"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive with optimizer {self.optimizer}")
        if self.weight_decay < 0 or self.hidden < 0:
            raise ValueError("weight_decay and hidden must not be negative")


def adapter_seed(global_seed: int, index: int) -> int:
    """seed_j: a 63-bit seed from sha256(global seed, j), so adapters never share a random stream."""
    digest = hashlib.sha256(f"legonet-adapter:{global_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def adapter_bytes(weights: dict[str, np.ndarray], salt: str | None) -> bytes:
    """An adapter's file: safetensors of its weights, with the data salt (pipeline.data.salt) in the header inside a
    project, since the weights alone are recomputable by anyone who holds the shard (seeded training)."""
    return save(weights, metadata=None if salt is None else {SALT_KEY: salt})


def train_adapter(
    features: np.ndarray, labels: np.ndarray, n_classes: int, seed: int, params: TrainParams
) -> dict[str, np.ndarray]:
    """Train one head on softmax cross-entropy with ``params.optimizer``; returns its weights as float32 arrays.

    An empty shard returns an empty dict: that adapter is never consulted.
    """
    if features.shape[0] == 0:
        return {}
    import torch  # lazy: only training needs torch; routing, evaluation and serving read weights with numpy

    torch.set_num_threads(params.threads)
    generator = torch.Generator().manual_seed(seed)
    widths = [features.shape[1], *([params.hidden] if params.hidden else []), n_classes]
    layers = []  # (weight, bias) per linear layer: uniform(+-1/sqrt(fan_in)) weights from seed_j, zero biases
    for fan_in, fan_out in itertools.pairwise(widths):
        weight = (torch.rand((fan_out, fan_in), generator=generator) * 2 - 1) * (1.0 / fan_in**0.5)
        layers.append((weight, torch.zeros(fan_out)))
    fit = _fit_lbfgs if params.optimizer == "lbfgs" else _fit_adam
    trained = fit(torch, features, labels, n_classes, layers, generator, params)
    weights = {}
    for i, (weight, bias) in enumerate(trained):
        weights[f"layer{i}.weight"] = weight.numpy().astype(np.float32)
        weights[f"layer{i}.bias"] = bias.numpy().astype(np.float32)
    return weights


def _fit_adam(torch: Any, features: np.ndarray, labels: np.ndarray, n_classes: int, layers: list, generator: Any,
              params: TrainParams) -> list:
    """Minibatch Adam in a seeded order (``optimizer: adam``), kept bit for bit so old params files keep their bits."""
    torch.use_deterministic_algorithms(True)
    x = torch.from_numpy(np.array(features, dtype=np.float32))  # a writable copy
    y = torch.from_numpy(labels.astype(np.int64))
    linears = [torch.nn.Linear(w.shape[1], w.shape[0]) for w, _ in layers]
    model = torch.nn.Sequential(*[m for linear in linears for m in (linear, torch.nn.ReLU())][:-1])
    with torch.no_grad():
        for linear, (weight, bias) in zip(linears, layers, strict=True):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    optimiser = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(params.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], params.batch_size):
            batch = order[start : start + params.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return [(linear.weight.detach(), linear.bias.detach()) for linear in linears]


class _Objective:
    """Mean softmax cross-entropy + weight_decay / 2 * ||theta||^2 over one shard, and its gradient, in float64.

    ``theta`` is every layer's weight and bias flattened in order. The gradient is written out by hand (backprop
    through at most one hidden ReLU layer); every sum over rows is a matrix product with a ones vector, which MKL
    computes bitwise identically for any thread count (``MKL_CBWR``), where torch's own reductions split long rows
    by thread. The sums over a row's classes are matrix products too, and the softmax is written out (row maximum,
    exponent, sum, log): torch's ``log_softmax`` over rows of ten classes took as long as the forward matrix
    product. Each layer multiplies by a contiguous copy of its transposed weight (with a transposed view the forward
    product took half as long again). The objective runs a few hundred times per adapter: it is most of training.
    """

    def __init__(self, torch: Any, features: np.ndarray, labels: np.ndarray, n_classes: int,
                 shapes: list[tuple[int, int]], weight_decay: float):
        self.torch = torch
        self.x = torch.from_numpy(np.asarray(features, dtype=np.float64))
        rows = self.x.shape[0]
        self.labels = torch.from_numpy(labels.astype(np.int64)).view(-1, 1)
        self.targets = torch.zeros((rows, n_classes), dtype=torch.float64)  # one-hot, divided by the row count
        self.targets.scatter_(1, self.labels, 1.0 / rows)
        self.ones = torch.ones((rows, 1), dtype=torch.float64)
        self.class_ones = torch.ones((n_classes, 1), dtype=torch.float64)
        self.shapes = shapes
        self.weight_decay = weight_decay
        self.rows = rows
        # every (rows x width) intermediate is written into these on each call: a fresh tensor of that size is a
        # fresh mapping from the allocator, and its page faults cost a fifth of a call at 40,000 rows
        new = lambda *shape: torch.empty(shape, dtype=torch.float64)  # noqa: E731
        self.pre = [new(rows, fan_out) for fan_out, _ in shapes]
        self.hidden = [new(rows, fan_out) for fan_out, _ in shapes[:-1]]
        self.back = [new(rows, fan_out) for fan_out, _ in shapes[:-1]]
        self.active = [torch.empty((rows, fan_out), dtype=torch.bool) for fan_out, _ in shapes[:-1]]
        self.exps = new(rows, n_classes)
        self.scale, self.picked, self.column = new(rows, 1), new(rows, 1), new(rows, 1)

    def unpack(self, theta: Any) -> list[tuple[Any, Any]]:
        out, start = [], 0
        for fan_out, fan_in in self.shapes:
            weight = theta[start : start + fan_out * fan_in].view(fan_out, fan_in)
            start += fan_out * fan_in
            out.append((weight, theta[start : start + fan_out]))
            start += fan_out
        return out

    def __call__(self, theta: Any) -> tuple[float, Any]:
        torch = self.torch
        layers = self.unpack(theta)
        inputs = [self.x, *self.hidden]
        for i, (weight, bias) in enumerate(layers):
            torch.addmm(bias, inputs[i], weight.t().contiguous(), out=self.pre[i])
            if i < len(layers) - 1:
                torch.clamp_min(self.pre[i], 0.0, out=self.hidden[i])  # ReLU
        logits, exps, scale, picked, column = self.pre[-1], self.exps, self.scale, self.picked, self.column
        # the softmax written out: the row maximum (exact, whatever the order), exponent, row sum (a matrix product)
        logits.sub_(torch.amax(logits, dim=1, keepdim=True, out=column))
        torch.exp(logits, out=exps)
        torch.matmul(exps, self.class_ones, out=scale)
        torch.gather(logits, 1, self.labels, out=picked)
        picked.sub_(torch.log(scale, out=column))  # the log-probability of each row's label
        loss = -float(self.ones.t().matmul(picked)) / self.rows
        loss += 0.5 * self.weight_decay * _dot(torch, theta, theta)
        scale.mul_(self.rows).reciprocal_()
        delta = exps.mul_(scale).sub_(self.targets)  # d loss / d logits: softmax less one-hot, over the row count
        grads = []
        for i in range(len(layers) - 1, -1, -1):
            weight = layers[i][0]
            grads.append((delta.t().matmul(inputs[i]), delta.t().matmul(self.ones).view(-1)))
            if i:
                active = torch.gt(self.pre[i - 1], 0, out=self.active[i - 1])
                delta = torch.matmul(delta, weight, out=self.back[i - 1]).mul_(active)
        flat = torch.cat([t.reshape(-1) for pair in reversed(grads) for t in pair])
        return loss, flat + self.weight_decay * theta


def _dot(torch: Any, a: Any, b: Any) -> float:
    """<a, b> as a (1, P) x (P, 1) matrix product: MKL's, reproducible for any thread count."""
    return float(a.view(1, -1).matmul(b.view(-1, 1)))


def _fit_lbfgs(torch: Any, features: np.ndarray, labels: np.ndarray, n_classes: int, layers: list,
               generator: Any, params: TrainParams) -> list:
    """Full-batch L-BFGS (``optimizer: lbfgs``): two-loop recursion over ``HISTORY`` pairs, Armijo backtracking
    from the unit step (the first step scaled to a unit move), a pair kept only when its curvature s.y > 0."""
    objective = _Objective(torch, features, labels, n_classes, [tuple(w.shape) for w, _ in layers],
                           params.weight_decay)
    theta = torch.cat([t.to(torch.float64).reshape(-1) for pair in layers for t in pair])
    loss, grad = objective(theta)
    history: list[tuple[Any, Any, float]] = []  # (s, y, 1 / s.y)
    for step in range(params.iterations):
        if float(grad.abs().max()) <= GRADIENT_TOLERANCE:
            break
        direction = -grad
        alphas = []
        for s, y, rho in reversed(history):
            alpha = rho * _dot(torch, s, direction)
            direction = direction - alpha * y
            alphas.append(alpha)
        if history:
            s, y, rho = history[-1]
            direction = direction * (1.0 / (rho * _dot(torch, y, y)))
        for (s, y, rho), alpha in zip(history, reversed(alphas), strict=True):
            direction = direction + (alpha - rho * _dot(torch, y, direction)) * s
        slope = _dot(torch, grad, direction)
        if slope >= 0:  # not a descent direction (numerical noise): restart from the gradient
            history.clear()
            direction, slope = -grad, -_dot(torch, grad, grad)
        # |g|_1 as a matrix product too: torch's sum splits more than 32,768 entries (a wide hidden layer) by thread
        size = 1.0 if step else min(1.0, 1.0 / _dot(torch, grad.abs(), torch.ones_like(grad)))
        for _ in range(MAX_HALVINGS):
            candidate = theta + size * direction
            new_loss, new_grad = objective(candidate)
            if new_loss <= loss + ARMIJO * size * slope:
                break
            size *= 0.5
        else:
            break  # no decrease possible at float64 resolution: theta is the optimum found
        s, y = candidate - theta, new_grad - grad
        curvature = _dot(torch, s, y)
        if curvature > 0:
            history.append((s, y, 1.0 / curvature))
            del history[:-HISTORY]
        theta, loss, grad = candidate, new_loss, new_grad
    return objective.unpack(theta)


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
