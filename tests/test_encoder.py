"""Encoder tests on the real models: batch invariance (docs/design.md sections 2 and 8), deterministic export, errors.

Batch invariance is what makes unlearning exact: if a sample's embedding depended on its batch neighbours,
deleting a neighbour would change it and a from-scratch build would not be bit-identical.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import pipeline.model.encoder as enc
from pipeline.errors import EncoderError
from pipeline.model.encoder import ENCODERS, Encoder, export_encoder, modality

IMAGE_SIZE = 64
# the pretrained encoders; `none` (a table's identity graph, no weights) is covered by tests/test_own_data.py
PRETRAINED = [name for name, kind in ENCODERS.items() if kind != "table"]
REPO = pathlib.Path(enc.__file__).resolve().parents[1]


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[pathlib.Path, dict]]:
    """Each encoder exported once in this process; tests share the files to stay within the time budget."""
    out = tmp_path_factory.mktemp("encoders")
    return {
        name: (out / f"{name}.onnx", export_encoder(name, IMAGE_SIZE, out / f"{name}.onnx"))
        for name in PRETRAINED
    }


def _images(n: int) -> list[np.ndarray]:
    """Mixed grayscale / RGB images of several sizes, so resizing and channel handling are covered too."""
    rng = np.random.default_rng(7)
    shapes = [(28, 28), (28, 28, 3), (64, 64), (100, 80, 3), (17, 33)]
    return [rng.integers(0, 256, shapes[i % len(shapes)], dtype=np.uint8) for i in range(n)]


def _texts(n: int) -> list[str]:
    """Texts from 0 to ~400 tokens: every length bucket, plus truncation at 256."""
    rng = np.random.default_rng(11)
    words = ["the", "a", "privacy", "deletion", "request", "model", "adapter", "shard", "ünïcode", "日本"]
    lengths = [0, 1, 5, 12, 25, 50, 90, 180, 400]
    counts = [lengths[i % len(lengths)] + int(rng.integers(0, 4)) for i in range(n)]
    return [" ".join(rng.choice(words, c)) for c in counts]


def _assert_embeddings(emb: np.ndarray, n: int, dim: int) -> None:
    assert emb.dtype == np.float32
    assert emb.shape == (n, dim)
    assert emb.flags.c_contiguous
    assert np.isfinite(emb).all()


@pytest.mark.parametrize(("name", "payloads"), [("efficientnet-lite0", _images(70)), ("minilm", _texts(70))])
def test_batch_invariance(exported: dict, name: str, payloads: list) -> None:
    path, meta = exported[name]
    encoder = Encoder(name, path, IMAGE_SIZE, threads=1)
    assert encoder.dim == meta["dim"]
    alone = np.stack([encoder.encode([p])[0] for p in payloads])
    _assert_embeddings(alone, len(payloads), encoder.dim)
    for size in (7, 64, 65):
        _assert_embeddings(batched := encoder.encode(payloads[:size]), size, encoder.dim)
        np.testing.assert_array_equal(batched, alone[:size], err_msg=f"batch of {size}")
    # Other positions, other neighbours (and for text, other bucket mixes in the same call).
    order = np.random.default_rng(3).permutation(len(payloads))
    shuffled = encoder.encode([payloads[i] for i in order])
    np.testing.assert_array_equal(shuffled, alone[order])
    np.testing.assert_array_equal(encoder.encode(payloads[::-1][:9]), alone[::-1][:9])


def test_export_is_byte_identical_across_processes(exported: dict, tmp_path: pathlib.Path) -> None:
    script = (
        "import json, pathlib, sys\n"
        "from pipeline.model.encoder import export_encoder\n"
        "out = pathlib.Path(sys.argv[1])\n"
        f"print(json.dumps({{n: export_encoder(n, {IMAGE_SIZE}, out / (n + '.onnx')) for n in {PRETRAINED!r}}}))\n"
    )
    # a shell without MKL_CBWR, where this process has it (importing `pipeline` pins it): MKL's code path changed
    # the conv weights the export folds batch norm into, so the two files differed before it was pinned
    assert os.environ["MKL_CBWR"] == "AVX2,STRICT"
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env={name: value for name, value in _subprocess_env().items() if name != "MKL_CBWR"},
        capture_output=True,
        text=True,
        check=True,
    )
    again = json.loads(done.stdout)
    for name, (path, meta) in exported.items():
        assert again[name] == meta
        assert (tmp_path / f"{name}.onnx").read_bytes() == path.read_bytes()
    assert exported["efficientnet-lite0"][1]["dim"] == 1280
    assert exported["efficientnet-lite0"][1]["image_size"] == IMAGE_SIZE
    assert exported["minilm"][1]["dim"] == 384
    for name, (_, meta) in exported.items():
        assert meta["name"] == name and meta["modality"] == ENCODERS[name] and meta["engine"] == "onnxruntime"
        assert len(meta["weights_sha256"]) == 64


def test_minilm_is_unit_norm_and_semantic(exported: dict) -> None:
    """Sanity of the exported pipeline (pooling + normalisation): unit vectors, similar texts closer."""
    encoder = Encoder("minilm", exported["minilm"][0], IMAGE_SIZE)
    emb = encoder.encode(["delete my data", "please erase my personal data", "the cat sat on the mat"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_progress_reports_every_item(exported: dict) -> None:
    encoder = Encoder("efficientnet-lite0", exported["efficientnet-lite0"][0], IMAGE_SIZE)
    done: list[int] = []
    _assert_embeddings(encoder.encode(_images(70), progress=done.append), 70, 1280)
    assert sum(done) == 70 and len(done) == 2
    _assert_embeddings(encoder.encode([]), 0, 1280)


def test_unknown_encoder_names_valid_choices(tmp_path: pathlib.Path) -> None:
    for call in (
        lambda: modality("resnet"),
        lambda: export_encoder("resnet", IMAGE_SIZE, tmp_path / "x.onnx"),
        lambda: Encoder("resnet", tmp_path / "x.onnx", IMAGE_SIZE),
    ):
        with pytest.raises(EncoderError, match="efficientnet-lite0, minilm"):
            call()
    assert not (tmp_path / "x.onnx").exists()
    assert issubclass(EncoderError, ValueError)
    assert modality("efficientnet-lite0") == "image" and modality("minilm") == "text"


def test_mismatched_model_file_is_refused(exported: dict) -> None:
    with pytest.raises(EncoderError, match="holds encoder 'minilm'"):
        Encoder("efficientnet-lite0", exported["minilm"][0], IMAGE_SIZE)
    with pytest.raises(EncoderError, match="image_size 64, not 32"):
        Encoder("efficientnet-lite0", exported["efficientnet-lite0"][0], 32)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(28, np.uint8),
        np.zeros((1, 28, 28, 3), np.uint8),
        np.zeros((28, 28, 4), np.uint8),
        np.zeros((28, 28), np.float32),
    ],
)
def test_bad_image_raises_value_error(exported: dict, bad: np.ndarray) -> None:
    encoder = Encoder("efficientnet-lite0", exported["efficientnet-lite0"][0], IMAGE_SIZE)
    with pytest.raises(ValueError, match="image"):
        encoder.encode([np.zeros((28, 28), np.uint8), bad])


def test_encoding_does_not_import_torch(exported: dict) -> None:
    """torch costs ~2.5 s per process; encode stages run one process per partition."""
    script = (
        "import sys, pathlib, numpy as np\n"
        "from pipeline.model.encoder import Encoder\n"
        "e = Encoder('efficientnet-lite0', pathlib.Path(sys.argv[1]), 64)\n"
        "e.encode([np.zeros((28, 28), np.uint8)])\n"
        "t = Encoder('minilm', pathlib.Path(sys.argv[2]), 64)\n"
        "t.encode(['hello'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(exported["efficientnet-lite0"][0]), str(exported["minilm"][0])],
        env=_subprocess_env(),
        check=True,
    )
