"""The exactness properties of docs/design.md section 2, one by one, on the real functions the stages call.

Each property is what lets a forget reproduce a from-scratch build bit for bit: routing and projection of a sample
depend on that sample alone, training is a pure function of (shard, params, seed) whatever the thread count, and
writers give equal bytes for equal content.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.dataset import SplitFractions, carve, partition_of, split_of, write_embeddings, write_table
from pipeline.model.adapters import TrainParams, adapter_proba, adapter_seed, train_adapter
from pipeline.model.keys import fit_keys, fit_projection, project
from pipeline.model.routing import route

RNG = np.random.default_rng(7)
REFERENCE = RNG.normal(size=(300, 64)).astype(np.float32)
POINTS = RNG.normal(size=(257, 64)).astype(np.float32)
PARAMS = TrainParams(epochs=30, lr=0.01, weight_decay=1e-4, batch_size=16, hidden=0, threads=1)


@pytest.fixture(scope="module")
def fitted() -> tuple[np.ndarray, np.ndarray]:
    projection = fit_projection(REFERENCE, 16)
    return projection, fit_keys(project(REFERENCE, projection), 12, seed=3, iterations=10)


def test_projection_and_routing_of_a_sample_depend_on_that_sample_alone(fitted: tuple[np.ndarray, np.ndarray]
                                                                         ) -> None:
    projection, keys = fitted
    together = project(POINTS, projection)
    alone = np.vstack([project(POINTS[i : i + 1], projection) for i in range(len(POINTS))])
    order = RNG.permutation(len(POINTS))
    shuffled = project(POINTS[order], projection)
    assert together.tobytes() == alone.tobytes()
    assert shuffled.tobytes() == together[order].tobytes()
    routed = route(together, keys, 3)
    assert np.array_equal(route(together[order], keys, 3), routed[order])
    assert np.array_equal(np.vstack([route(together[i : i + 1], keys, 3) for i in range(len(POINTS))]), routed)
    # deleting other samples (a forget) changes nothing for the rest
    kept = np.sort(RNG.choice(len(POINTS), size=100, replace=False))
    assert project(POINTS[kept], projection).tobytes() == together[kept].tobytes()
    assert np.array_equal(route(together[kept], keys, 3), routed[kept])


def test_keys_and_projection_are_a_function_of_reference_params_and_seed(fitted: tuple[np.ndarray, np.ndarray]
                                                                        ) -> None:
    projection, keys = fitted
    again = fit_projection(REFERENCE, 16)
    assert again.tobytes() == projection.tobytes()
    assert fit_keys(project(REFERENCE, again), 12, seed=3, iterations=10).tobytes() == keys.tobytes()
    assert fit_keys(project(REFERENCE, again), 12, seed=4, iterations=10).tobytes() != keys.tobytes()


def test_ties_break_by_adapter_index() -> None:
    keys = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert route(np.zeros((1, 2), np.float32), keys, 2).tolist() == [[0, 1]]


def test_empty_adapters_are_never_consulted() -> None:
    keys = np.array([[0.0, 0.0], [5.0, 0.0], [9.0, 0.0]], dtype=np.float32)
    usable = np.array([False, True, True])
    assert route(np.zeros((1, 2), np.float32), keys, 2, usable).tolist() == [[1, 2]]


def test_splits_and_partitions_follow_the_sample_id_only() -> None:
    ids = [f"s-{i}" for i in range(400)]
    frame = pd.DataFrame({"sample_id": ids, "label": np.arange(400) % 3, "text": ["x"] * 400})
    fractions = SplitFractions(0.2, 0.2)
    full = carve(frame, fractions, 3)
    fewer = carve(frame.iloc[::3].sample(frac=1.0, random_state=1), fractions, 3)
    for name, part in fewer.items():
        assert set(part["sample_id"]) == set(full[name]["sample_id"]) & set(ids[::3])
    assert {split_of(i, fractions) for i in ids} == {"reference", "test", "train"}
    assert len({partition_of(i, 3) for i in ids}) == 3


def _train_digests(threads: int) -> list[str]:
    """Train in a fresh process with the given torch thread count; the weights' sha256 per optimiser and head.

    L-BFGS: a linear head to convergence and a hidden-layer head for a fixed number of steps; Adam: a hidden-layer
    head (its minibatch weight-gradient matmuls are where 1 and 2 threads differed without MKL_CBWR). The last
    shard has enough rows (4,000 x 10 classes, 4,000 x 32 hidden units) that torch splits the objective's
    elementwise steps between threads (above 32,768 elements), as it does for the shards of real data.
    """
    code = (
        "import sys, hashlib, numpy as np\n"
        "from safetensors.numpy import save\n"
        "from pipeline.model.adapters import TrainParams, train_adapter\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.normal(size=(600, 128)).astype(np.float32); y = rng.integers(0, 10, 600)\n"
        "wide = rng.normal(size=(4000, 128)).astype(np.float32); z = rng.integers(0, 10, 4000)\n"
        f"kw = dict(threads={threads})\n"
        "for x, y, p in [(x, y, TrainParams(optimizer='lbfgs', iterations=200, weight_decay=1e-3, **kw)),\n"
        "          (x, y, TrainParams(optimizer='lbfgs', iterations=20, weight_decay=1e-3, hidden=32, **kw)),\n"
        "          (x, y, TrainParams(epochs=4, lr=0.01, weight_decay=1e-4, batch_size=64, hidden=32, **kw)),\n"
        "          (wide, z, TrainParams(optimizer='lbfgs', iterations=15, weight_decay=1e-3, hidden=32, **kw))]:\n"
        "    print(hashlib.sha256(save(train_adapter(x, y, 10, 12345, p))).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_training_is_seeded_and_independent_of_the_thread_count() -> None:
    one, again, two = _train_digests(1), _train_digests(1), _train_digests(2)
    assert len(set(one)) == 4, "four different trainings must give four different weights"
    assert one == again, "two runs in two processes must give the same weights"
    assert one == two, "1 and 2 threads must give the same weights (MKL_CBWR=AVX2,STRICT)"


def test_lbfgs_reaches_the_optimum_whatever_the_initial_weights() -> None:
    """The linear head's objective is strictly convex: two seeds converge to the same weights (to the
    gradient tolerance), and the gradient there is zero: the head is the regularised optimum, not an early stop."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = (x[:, :3] + 0.3 * rng.normal(size=(300, 3))).argmax(axis=1)
    params = TrainParams(optimizer="lbfgs", iterations=500, weight_decay=1e-2)
    first = train_adapter(x, y, 3, adapter_seed(0, 1), params)
    other = train_adapter(x, y, 3, adapter_seed(0, 2), params)
    assert any(not np.array_equal(first[k], other[k]) for k in first), "different seeds start elsewhere"
    for name in first:
        np.testing.assert_allclose(first[name], other[name], atol=1e-3)
    proba = adapter_proba(first, x).astype(np.float64)
    weight, bias = first["layer0.weight"].astype(np.float64), first["layer0.bias"].astype(np.float64)
    delta = (proba - np.eye(3)[y]) / len(y)
    grad = np.concatenate([(delta.T @ x + 1e-2 * weight).ravel(), delta.sum(axis=0) + 1e-2 * bias])
    assert np.abs(grad).max() < 1e-4
    assert (proba.argmax(axis=1) == y).mean() > 0.8  # labels carry noise: not all are separable


def test_train_params_refuse_an_unknown_optimizer_or_a_missing_setting() -> None:
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        TrainParams(optimizer="sgd", weight_decay=0.0)
    with pytest.raises(ValueError, match="iterations=0"):
        TrainParams(optimizer="lbfgs", weight_decay=0.0)
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainParams(optimizer="adam", epochs=1, lr=0.1, weight_decay=0.0)


def test_training_depends_on_its_seed_and_predicts() -> None:
    x = RNG.normal(size=(200, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    first = train_adapter(x, y, 2, adapter_seed(0, 1), PARAMS)
    other = train_adapter(x, y, 2, adapter_seed(0, 2), PARAMS)
    assert any(not np.array_equal(first[k], other[k]) for k in first)
    assert (adapter_proba(first, x).argmax(axis=1) == y).mean() > 0.9
    assert train_adapter(x[:0], y[:0], 2, 1, PARAMS) == {}
    assert adapter_seed(0, 1) != adapter_seed(0, 2) != adapter_seed(1, 1)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_writers_are_byte_stable_for_equal_content(tmp_path: Path) -> None:
    frame = pd.DataFrame({"sample_id": [f"id-{i:03d}" for i in range(50)], "label": np.arange(50) % 5})
    embeddings = RNG.normal(size=(50, 8)).astype(np.float32)
    # a filtered frame keeps stale row labels; a fresh one built from the kept rows must write the same bytes
    keep = frame.index % 3 != 0
    write_embeddings(tmp_path / "filtered.parquet", frame[keep], embeddings[keep])
    fresh = pd.DataFrame({"sample_id": frame["sample_id"][keep].tolist(), "label": frame["label"][keep].tolist()})
    write_embeddings(tmp_path / "fresh.parquet", fresh.iloc[::-1], embeddings[keep][::-1])
    assert _md5(tmp_path / "filtered.parquet") == _md5(tmp_path / "fresh.parquet")
    write_table(frame[keep], tmp_path / "a.parquet")
    write_table(fresh, tmp_path / "b.parquet")
    assert _md5(tmp_path / "a.parquet") == _md5(tmp_path / "b.parquet")


def test_lineage_digest_of_a_directory_is_dvcs(tmp_path: Path) -> None:
    """Lineage logs one digest per dvc.lock entry; a directory's is DVC's own `.dir` md5 (dvc-data's Tree)."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    from pipeline.tracking.lineage import dvc_digest, file_md5

    folder = tmp_path / "shards"
    for relpath, data in {"block-0001/adapter-0010.parquet": b"a", "block-0000/adapter-0002.parquet": b"bb",
                          "block-0000/adapter-0001.parquet": b"", ".gitignore": b"/x\n"}.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(data)
    tree = Tree()
    for path in folder.rglob("*"):
        if path.is_file():
            tree.add(path.relative_to(folder).parts, Meta(), HashInfo("md5", file_md5(path)))
    tree.digest()
    assert dvc_digest(folder, tmp_path) == tree.hash_info.value and tree.hash_info.value.endswith(".dir")
    assert dvc_digest(folder / ".gitignore", tmp_path) == hashlib.md5(b"/x\n").hexdigest()
