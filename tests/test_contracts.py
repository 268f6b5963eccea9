"""Data contracts at every stage boundary (issue 4), for real: a file that breaks one rule stops `dvc repro` at the
stage that reads it, with a message naming the file, the rule and the first failing sample; the stages downstream
do not run and the failed stage leaves no output behind.

Runtime: each case is a copy of the session's `built_project`, one tampered file and a `dvc repro` that runs up to
the failing stage (~5-15 s each); the schema cases at the top need no project.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_project

from pipeline.data.contracts import adapter_load_schema, routing_schema, validate
from pipeline.data.dataset import check_samples, read_table, write_table
from pipeline.errors import ContractError, DataError
from pipeline.tracking.lineage import file_md5

RUNNING = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)
# what runs after each stage that can fail here (dvc.yaml): none of it may run once the stage failed
DOWNSTREAM = {
    "encode@part-0001": {"assign", "train@0000", "train@0001", "quality", "baseline", "evaluate", "package"},
    "encode@test": {"baseline", "evaluate", "package"},
    "keys": {"assign", "train@0000", "train@0001", "quality", "baseline", "evaluate", "package"},
    "assign": {"train@0000", "train@0001", "quality", "evaluate", "package"},
    "train@0000": {"evaluate", "package"},
    "quality": {"package"},
    "baseline": set(),
    "evaluate": {"package"},
}
# What the stage writes. The encoded tables, the shard folder and routing index (assign) and train's block folders
# persist between runs (the stages build on them incrementally): a failing stage must leave them unchanged, which
# the test checks for every case (the quality stage's per-shard partials too).
OUTPUTS = {
    "encode@part-0001": [],
    "encode@test": [],
    "keys": ["models/keys.npy", "models/projection.npy"],
    "assign": [],
    "train@0000": [],
    "quality": ["reports/quality/result.json", "reports/quality/tables", "reports/quality/data_docs"],
    "baseline": ["metrics/baseline.json"],
    "evaluate": ["metrics/evaluate.json", "metrics/per_class.csv", "reports/evaluate/adapter_load.csv"],
}


# --- the schemas themselves (no project needed) ---

def test_check_samples_delegates_to_the_contract() -> None:
    frame = pd.DataFrame({"sample_id": ["a-1", "a-2", "a-2"], "label": [0, 1, 7], "text": ["x", "y", " "]})
    with pytest.raises(ContractError) as caught:
        check_samples(frame, "user.csv", "text", [0, 1], None)
    message = str(caught.value)
    assert isinstance(caught.value, DataError) and message.startswith("user.csv: breaks the samples contract")
    assert "field_uniqueness" in message and "'a-2'" in message
    assert "isin([0, 1])" in message and "text is not empty" in message


def test_routing_and_adapter_load_contracts_name_rule_and_row() -> None:
    routing = pd.DataFrame({"sample_id": ["s-1", "s-2"], "partition": np.array([0, 1], dtype=np.int32),
                            "adapters": [np.array([0, 1], np.int32), np.array([2, 2], np.int32)]})
    with pytest.raises(ContractError, match=r"data/routing.parquet: .*adapters: rule 2 distinct adapters in 0\.\.3 "
                                            r"fails for 1 sample\(s\) 's-2'"):
        validate(routing, routing_schema(n=4, k=2, partitions=2, classes=list(range(10))), "data/routing.parquet")
    load = pd.DataFrame({"adapter": [0, 1], "train_samples": [3, -1], "test_activations": [1, 1]})
    with pytest.raises(ContractError, match=r"adapter_load.csv: .*train_samples: rule greater_than_or_equal_to\(0\)"):
        validate(load, adapter_load_schema(2), "metrics/adapter_load.csv")


# --- each stage refuses a file that breaks one rule ---

def _embeddings_table(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> str:
    """Rewrite an encoded table with its embeddings changed; returns the first sample ID."""
    table = pq.read_table(path)
    values = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    values = change(values)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    pq.write_table(table.set_column(table.column_names.index("embedding"), "embedding", column), path)
    return str(table.column("sample_id")[0])


def wrong_dtype(root: Path) -> tuple[str, str, str]:
    """Raw partition with float labels -> encode@part-0001."""
    path = root / "data/raw/part-0001.parquet"
    frame = read_table(path)
    write_table(frame.assign(label=frame["label"].astype(np.float64)), path)
    return "data/raw/part-0001.parquet", "dtype('int64')", frame["sample_id"].iloc[0]


def unknown_label(root: Path) -> tuple[str, str, str]:
    """Test split with a label outside data.classes -> encode@test."""
    path = root / "data/test/test.parquet"
    frame = read_table(path)
    frame.loc[3, "label"] = 42
    write_table(frame, path)
    return "data/test/test.parquet", "isin([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])", frame["sample_id"].iloc[3]


def nan_embedding(root: Path) -> tuple[str, str, str]:
    """Encoded reference split with a NaN -> keys."""
    def spoil(values: np.ndarray) -> np.ndarray:
        values[0, 5] = np.nan
        return values
    return "data/encoded/reference.parquet", "finite", _embeddings_table(root / "data/encoded/reference.parquet",
                                                                         spoil)


def wrong_width(root: Path) -> tuple[str, str, str]:
    """Encoded train partition one float short -> assign (or baseline, whichever DVC runs first)."""
    sample = _embeddings_table(root / "data/encoded/train/part-0000.parquet", lambda v: v[:, :-1])
    return "data/encoded/train/part-0000.parquet", "embedding width is", sample


def duplicate_id(root: Path) -> tuple[str, str, str]:
    """A shard holding one sample twice -> train@0000 (or quality, which reads the shards too)."""
    path = root / "data/shards/block-0000/adapter-0000.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table.slice(0, 1), table]), path)
    return "data/shards/block-0000/adapter-0000.parquet", "field_uniqueness", str(table.column("sample_id")[0])


def routed_twice(root: Path) -> tuple[str, str, str]:
    """An encoded partition given a row whose ID another partition holds -> assign, which checks the new rows of
    the routing index only, and each ID once over the whole index."""
    theirs, ours = (pq.read_table(root / f"data/encoded/train/part-000{i}.parquet") for i in (0, 1))
    twin = theirs.slice(0, 1).replace_schema_metadata(ours.schema.metadata)
    pq.write_table(pa.concat_tables([ours, twin]), root / "data/encoded/train/part-0001.parquet")
    return "data/routing.parquet", "in more than one raw partition", str(twin.column("sample_id")[0])


def repeated_row(root: Path) -> tuple[str, str, str]:
    """An encoded partition holding one of its rows twice, embedding and all -> assign, which reads the rows of a
    changed partition even when none is new and leaves its embeddings unread."""
    path = root / "data/encoded/train/part-0001.parquet"
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)
    return "data/encoded/train/part-0001.parquet", "field_uniqueness", str(table.column("sample_id")[0])


def routing_from_elsewhere(root: Path) -> tuple[str, str, str]:
    """A routing index that `assign` did not write (no metadata) with a partition out of range -> quality, which
    checks in full an index that does not say assign made it under these params."""
    path = root / "data/routing.parquet"
    table = pq.read_table(path)
    partitions = table.column("partition").to_numpy().copy()
    partitions[2] = 99
    table = table.set_column(table.column_names.index("partition"), "partition", pa.array(partitions, pa.int32()))
    pq.write_table(table.replace_schema_metadata(None), path)
    return "data/routing.parquet", "in_range", str(table.column("sample_id")[2])


CASES = {
    # name: (spoil, how DVC is told the file is the stage's input, the stages that may be the one to refuse it)
    "wrong-dtype": (wrong_dtype, ["add", "data/raw/part-0001.parquet"], {"encode@part-0001"}),
    "unknown-label": (unknown_label, ["add", "data/test/test.parquet"], {"encode@test"}),
    "nan-embedding": (nan_embedding, ["commit", "-f", "encode@reference"], {"keys"}),
    "wrong-embedding-width": (wrong_width, ["commit", "-f", "encode@part-0000"], {"assign", "baseline"}),
    "duplicate-sample-id": (duplicate_id, ["commit", "-f", "assign"], {"train@0000", "quality"}),
    "routed-twice": (routed_twice, ["commit", "-f", "encode@part-0001"], {"assign"}),
    "repeated-row": (repeated_row, ["commit", "-f", "encode@part-0001"], {"assign"}),
    "routing-not-from-assign": (routing_from_elsewhere, ["commit", "-f", "assign"], {"quality"}),
}


def _tree(root: Path, rel: str) -> dict[str, str]:
    path = root / rel
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {f.relative_to(root).as_posix(): file_md5(f) for f in files}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stage_refuses_a_file_that_breaks_its_contract(built_project: Path, tmp_path: Path, case: str) -> None:
    spoil, tell_dvc, refusers = CASES[case]
    root = copy_project(built_project, tmp_path / "project")
    named, rule, sample = spoil(root)
    subprocess.run([sys.executable, "-m", "dvc", *tell_dvc, "-q"], cwd=root, check=True, capture_output=True)
    persisted = ["models/adapters", "data/shards", "data/routing.parquet", "data/encoded", "reports/quality/partials"]
    persisted_before = {rel: _tree(root, rel) for rel in persisted}
    lineage_before = set((root / ".legonet/lineage").glob("*.json")) if (root / ".legonet/lineage").is_dir() else set()

    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, capture_output=True, text=True)
    output = result.stdout + result.stderr
    ran = RUNNING.findall(output)
    assert result.returncode != 0 and ran, output
    failed = ran[-1]
    assert failed in refusers, f"{case}: expected one of {refusers} to refuse the file, {failed} failed:\n{output}"
    message = " ".join(output.split())
    assert f"error: {named}: breaks the" in message, message
    assert rule in message and repr(sample) in message, message
    assert "Traceback" not in output, output
    assert not set(ran) & DOWNSTREAM[failed], f"stages downstream of {failed} ran: {ran}"
    for rel in OUTPUTS[failed]:
        assert not (root / rel).exists(), f"{failed} failed but left {rel} behind"
    for rel in persisted:
        assert _tree(root, rel) == persisted_before[rel], f"a failing build may not write {rel}"
    written = {p.name for p in (root / ".legonet/lineage").glob("*.json")} - {p.name for p in lineage_before}
    assert not [n for n in written if failed.replace("@", "_") in n], "a failed stage must not record lineage"


def test_an_empty_shard_keeps_its_contract(tmp_path: Path) -> None:
    """An adapter may lose every sample (forget): its empty shard, written and read back, is still valid."""
    from pipeline.data.contracts import check_encoded
    from pipeline.data.dataset import read_embeddings, write_embeddings

    path = tmp_path / "adapter-0003.parquet"
    empty = pd.DataFrame({"sample_id": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64")})
    write_embeddings(path, empty, np.zeros((0, 8), np.float32))
    frame, embeddings = read_embeddings(path)
    check_encoded(frame, embeddings, path, [0, 1], 8)


def test_embeddings_judged_as_one_array_break_the_same_rules_row_by_row() -> None:
    """A clean 2-D float32 array passes the embedding rules at once; any array that breaks one (a NaN, float64, the
    wrong width) is judged row by row, so the message still names the rule and the samples."""
    from pipeline.data.contracts import check_encoded, check_shards

    frame = pd.DataFrame({"sample_id": ["x-1", "x-2", "x-3"], "label": np.array([0, 1, 0], dtype=np.int64)})
    clean = np.ones((3, 4), np.float32)
    check_encoded(frame, clean, "e.parquet", [0, 1], 4)
    with_nan = clean.copy()
    with_nan[1, 2] = np.nan
    broken = {"finite": (with_nan, r"finite \(no NaN or inf\) fails for 1 sample\(s\) 'x-2'"),
              "dtype": (clean.astype(np.float64), r"float32 vector fails for 3 sample\(s\) 'x-1', 'x-2', 'x-3'"),
              "width": (np.ones((3, 5), np.float32), r"embedding width is 4 fails for 3 sample\(s\)")}
    for embeddings, message in broken.values():
        with pytest.raises(ContractError, match=message):
            check_encoded(frame, embeddings, "e.parquet", [0, 1], 4)
    with pytest.raises(ContractError, match=r"s/a\.parquet: .*finite \(no NaN or inf\) fails for 1 sample"):
        check_shards([(Path("s/a.parquet"), frame, with_nan)], [0, 1], 4)


def test_shards_are_checked_together_and_a_broken_one_is_named(tmp_path: Path) -> None:
    """`assign`, `quality` and `train` check all their shards in one pandera call (a sample may sit in several
    shards, never twice in one); a broken shard is still named by file, rule and sample."""
    from pipeline.data.contracts import check_shards

    def shard(ids: list[str], labels: list[int], dim: int = 4) -> tuple[pd.DataFrame, np.ndarray]:
        frame = pd.DataFrame({"sample_id": ids, "label": np.array(labels, dtype=np.int64)})
        return frame, np.ones((len(ids), dim), np.float32)

    empty = (pd.DataFrame({"sample_id": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64")}),
             np.zeros((0, 4), np.float32))
    good = [(Path("s/a-0.parquet"), *shard(["x-1", "x-2"], [0, 1])), (Path("s/a-1.parquet"), *shard(["x-1"], [0])),
            (Path("s/a-2.parquet"), *empty)]
    check_shards(good, [0, 1], 4)  # x-1 in two shards is fine

    cases = {
        "duplicate": ((["x-3", "x-3"], [0, 0], 4), r"s/a-3\.parquet: breaks the encoded contract: sample_id: "
                                                   r"rule field_uniqueness fails for 1 sample\(s\) 'x-3'"),
        "width": ((["x-4"], [1], 5), r"s/a-3\.parquet: .*embedding width is 4 fails for 1 sample\(s\) 'x-4'"),
        "label": ((["x-5"], [7], 4), r"s/a-3\.parquet: .*label: rule isin\(\[0, 1\]\) fails for 1 sample\(s\) 'x-5'"),
    }
    for (ids, labels, dim), message in cases.values():
        broken = (Path("s/a-3.parquet"), *shard(ids, labels, dim))
        with pytest.raises(ContractError, match=message):
            check_shards([*good, broken], [0, 1], 4)
