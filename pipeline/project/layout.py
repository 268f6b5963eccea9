"""Where a legonet project keeps each artifact (docs/design.md section 3), spelt once for stages, forget and audit.

Paths are relative to the project root (the folder of dvc.yaml), which is the working directory of every stage.
Adapters are grouped into blocks: one DVC stage trains one block, so the number of stages (and DVC's bookkeeping)
does not grow with the number of adapters, while every adapter stays its own file with its own hash.
"""

from __future__ import annotations

from pathlib import Path

# the project's own state, never DVC-tracked nor committed (journal, lock, memos, scratch, pending purges, lineage)
STATE_DIR = Path(".legonet")
RAW = Path("data/raw")
REFERENCE = Path("data/reference/reference.parquet")
TEST = Path("data/test/test.parquet")
ENCODED = Path("data/encoded")
ENCODED_TRAIN = ENCODED / "train"
ENCODED_REFERENCE = ENCODED / "reference.parquet"
ENCODED_TEST = ENCODED / "test.parquet"
SHARDS = Path("data/shards")
ROUTING = Path("data/routing.parquet")
ENCODER = Path("models/encoder.onnx")
ENCODER_INFO = Path("models/encoder.json")
PROJECTION = Path("models/projection.npy")
KEYS = Path("models/keys.npy")
REFERENCE_NORMS = Path("models/reference_norms.json")  # the quality norm rule's source, written by `keys`
ADAPTERS = Path("models/adapters")
PACKAGE = Path("models/package")
METRICS = Path("metrics")
PROBE = Path("reports/probe")  # the baseline probe's per-shard sufficient statistics
EVALUATION = Path("reports/evaluate")  # the evaluate stage's per-adapter test outputs
TEST_POINTS = EVALUATION / "test-points.parquet"  # the test split's projected features (evaluate, baseline)
# train and test samples per adapter: a DVC output, not a git metric (its diff would name the adapters a forget
# retrained, docs/audit.md)
ADAPTER_LOAD = EVALUATION / "adapter_load.csv"


def partition_name(index: int) -> str:
    return f"part-{index:04d}"


def adapter_name(index: int) -> str:
    return f"adapter-{index:04d}"


def block_name(index: int) -> str:
    return f"block-{index:04d}"


def block_count(blocks: int) -> int:
    """Number of train blocks: ``adapters.blocks``, whatever n is (dvc.yaml's train stages must not change with
    n, so that n can be swept with `dvc exp run -S`); with fewer adapters than blocks, the blocks from n on are
    empty. Adapter j's block is the same as if the count stopped at n (blocks of one adapter)."""
    return max(1, blocks)


def block_of(adapter: int, n: int, blocks: int) -> int:
    """The block of adapter j: contiguous ranges of ceil(n / blocks) adapters."""
    size = -(-n // block_count(blocks))
    return adapter // size


def block_adapters(block: int, n: int, blocks: int) -> range:
    size = -(-n // block_count(blocks))
    return range(block * size, min(n, (block + 1) * size))


def raw_path(index: int) -> Path:
    return RAW / f"{partition_name(index)}.parquet"


def encoded_path(index: int) -> Path:
    return ENCODED_TRAIN / f"{partition_name(index)}.parquet"


def probe_path(adapter: int) -> Path:
    return PROBE / f"{adapter_name(adapter)}.safetensors"


def shard_dir(block: int) -> Path:
    return SHARDS / block_name(block)


def adapter_dir(block: int) -> Path:
    return ADAPTERS / block_name(block)


def shard_path(adapter: int, n: int, blocks: int) -> Path:
    return shard_dir(block_of(adapter, n, blocks)) / f"{adapter_name(adapter)}.parquet"


def adapter_path(adapter: int, n: int, blocks: int) -> Path:
    return adapter_dir(block_of(adapter, n, blocks)) / f"{adapter_name(adapter)}.safetensors"


def adapter_info_path(adapter: int, n: int, blocks: int) -> Path:
    return adapter_dir(block_of(adapter, n, blocks)) / f"{adapter_name(adapter)}.json"


def adapter_index(path: Path) -> int:
    """adapter-0042.safetensors -> 42."""
    return int(path.stem.split("-")[1])
