"""The cost rule (docs/design.md section 4): a forget's stages keep what they computed for unchanged rows and
write exactly the bytes a full recomputation writes.

One built tiny project is changed the ways a forget or a data update changes it (train and test rows removed,
added, relabelled, their payload replaced), `dvc repro` runs the incremental stages, and a copy whose persisted
state is deleted runs the same stages from scratch: every file they write must be equal, byte for byte.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_STRIDE, copy_project

from pipeline.data.dataset import (
    bundled_mnist,
    read_embeddings,
    read_metadata,
    read_table,
    write_embeddings,
    write_rows,
    write_table,
)
from pipeline.model.probe import fit_probe, probe_predict, probe_statistics
from pipeline.model.routing import routing_changes

PARTITIONS = 2
RAW = [f"data/raw/part-{p:04d}.parquet" for p in range(PARTITIONS)]
TEST = "data/test/test.parquet"
# every file an incremental stage writes (the persisted state and the results)
WRITTEN = ("data/encoded", "data/shards", "data/routing.parquet", "reports/probe", "reports/evaluate",
           "metrics/evaluate.json", "metrics/baseline.json", "metrics/per_class.csv",
           "reports/quality/result.json", "reports/quality/tables", "reports/quality/partials")
ENCODED = re.compile(r"encode (\S+): encoded (\d+) of (\d+) samples")


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def files(root: Path) -> dict[str, bytes]:
    found = {}
    for top in WRITTEN:
        path = root / top
        for file in sorted(path.rglob("*") if path.is_dir() else [path]):
            if file.is_file() and file.name != ".gitignore":
                found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


def changed(frame: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Drop two rows, relabel one, replace one payload (inverted pixels) and add ``new``'s rows."""
    frame = frame.iloc[2:].reset_index(drop=True)
    frame.loc[0, "label"] = (frame.loc[0, "label"] + 1) % 10
    frame.loc[1, "image"] = bytes(255 - b for b in frame.loc[1, "image"])
    return pd.concat([frame, new], ignore_index=True).sort_values("sample_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def incremental(built_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An incremental `dvc repro` after changing every raw partition and the test split, and the same stages run
    from scratch on a copy of its inputs."""
    from pipeline.data.dataset import partition_of

    root = copy_project(built_project, tmp_path_factory.mktemp("incremental") / "p")
    unused = bundled_mnist().iloc[1::TINY_STRIDE]  # samples the project does not hold
    unused = unused[~unused["sample_id"].isin(set(read_table(root / "data/routing.parquet")["sample_id"]))]
    for index, rel in enumerate(RAW):
        new = unused[unused["sample_id"].map(lambda s: partition_of(s, PARTITIONS)) == index].iloc[:2]
        write_table(changed(read_table(root / rel), new), root / rel)
    write_table(changed(read_table(root / TEST), unused.iloc[-1:]), root / TEST)
    run("dvc", "add", "-q", *RAW, TEST, cwd=root)
    log = run("dvc", "repro", cwd=root)
    scratch = copy_project(root, tmp_path_factory.mktemp("scratch") / "p")
    for top in ("data/encoded/train", "data/encoded/test.parquet", "data/shards", "data/routing.parquet",
                "reports/probe", "reports/evaluate", "reports/quality/partials"):
        path = scratch / top
        for file in (path.rglob("*.parquet") if path.is_dir() else [path]):
            file.unlink()
        if top.startswith("reports"):
            for file in path.rglob("*"):
                file.unlink()
    full = "".join(run("stages.encode", name, src, f"data/encoded/{dst}", cwd=scratch) for name, src, dst in
                   [*((f"part-{p:04d}", RAW[p], f"train/part-{p:04d}.parquet") for p in range(PARTITIONS)),
                    ("test", TEST, "test.parquet")])
    for stage in ("stages.assign", "stages.evaluate", "stages.baseline", "stages.quality"):
        full += run(stage, cwd=scratch)
    return {"root": root, "scratch": scratch, "log": log, "full": full}


def test_incremental_stages_write_what_a_full_recomputation_writes(incremental: dict) -> None:
    ours, theirs = files(incremental["root"]), files(incremental["scratch"])
    assert sorted(ours) == sorted(theirs) and len(ours) > 10
    differ = sorted(p for p in ours if ours[p] != theirs[p])
    assert not differ, f"incremental output differs from a full recomputation: {differ}"
    assert "Data and pipelines are up to date." in run("dvc", "repro", cwd=incremental["root"])


def test_a_changed_partition_encodes_only_its_new_rows(incremental: dict) -> None:
    """Per partition: 2 added rows and 1 changed payload are encoded; a relabelled row keeps its embedding."""
    counts = {name: (int(done), int(total)) for name, done, total in ENCODED.findall(incremental["log"])}
    assert set(counts) == {"part-0000", "part-0001", "test"}
    assert {name: done for name, (done, _) in counts.items()} == {"part-0000": 3, "part-0001": 3, "test": 2}
    full = {name: int(done) for name, done, _ in ENCODED.findall(incremental["full"])}
    assert full == {name: total for name, (_, total) in counts.items()}
    # the test split's kept routing: only the added row and the one whose payload changed are routed again
    test = counts["test"][1]
    assert f"evaluate: routed 2 of {test} test samples" in incremental["log"]
    assert f"evaluate: routed {test} of {test} test samples" in incremental["full"]


def test_another_encoding_or_an_edited_output_is_encoded_again(incremental: dict, tmp_path: Path) -> None:
    root = copy_project(incremental["root"], tmp_path / "p")
    target = root / "data/encoded/train/part-0000.parquet"
    original = target.read_bytes()
    args = ("stages.encode", "part-0000", RAW[0], "data/encoded/train/part-0000.parquet")
    assert "encoded 0 of" in run(*args, cwd=root)  # nothing changed: the encoder is not called
    frame, embeddings = read_embeddings(target, digests=True)
    embeddings = embeddings.copy()  # read zero-copy from Arrow, so read-only
    embeddings[0, 0] += 1.0
    write_embeddings(target, frame, embeddings)  # an edit DVC did not record
    log = run(*args, cwd=root)
    total = len(frame)
    assert f"encoded {total} of {total}" in log and target.read_bytes() == original
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("threads: 1                 # fixed onnxruntime",
                                                 "threads: 2                 # fixed onnxruntime"))
    assert f"encoded {total} of {total}" in run(*args, cwd=root)


def test_routing_changes_name_the_rows_to_route_again() -> None:
    columns = {"sample_id": ["a", "b", "c"], "partition": [0, 0, 1], "label": [1, 2, 3],
               "payload_sha256": [b"x", b"y", b"z"]}
    previous = pd.DataFrame(columns)
    current = pd.DataFrame({"sample_id": ["b", "c", "d"], "partition": [0, 1, 1], "label": [2, 4, 5],
                            "payload_sha256": [b"y", b"z", b"w"]})
    still, fresh = routing_changes(previous, current)
    assert still.tolist() == [False, True, False] and fresh.tolist() == [False, True, True]



def test_an_index_kept_in_arrow_is_written_with_the_bytes_of_the_same_rows_as_a_data_frame(incremental: dict) -> None:
    """`assign` keeps the routing index in Arrow (``write_rows``); the file is the one ``write_table`` writes from
    the same rows as a DataFrame, salt included (inside a project), so the upgrade changed no routing index."""
    index = incremental["root"] / "data/routing.parquet"
    metadata = read_metadata(index)
    frame, table = read_table(index), pq.read_table(index).replace_schema_metadata(None)
    assert frame["adapters"].map(len).min() >= 1 and len(frame) > 100  # a list column, rows of every partition
    written = {}
    for name, write in (("frame", lambda path: write_table(frame, path, metadata=metadata)),
                        ("arrow", lambda path: write_rows(table, path, metadata=metadata))):
        path = incremental["root"] / "data" / f"check-{name}" / "routing.parquet"  # same name: same salt label
        write(path)
        written[name] = path.read_bytes()
        shutil.rmtree(path.parent)
    assert written["frame"] == written["arrow"] == index.read_bytes()

def test_probe_statistics_add_up_and_fit_a_linear_rule() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    labels = rng.integers(0, 3, 300)
    features = (centres[labels] + rng.normal(size=(300, 8))).astype(np.float32)
    blocks = [probe_statistics(features[i:i + 100], labels[i:i + 100], 3) for i in range(0, 300, 100)]
    whole = probe_statistics(features, labels, 3)
    assert np.allclose(sum(b["gram"] for b in blocks), whole["gram"]) and int(whole["count"][0]) == 300
    weights = fit_probe(blocks, 1e-4)
    assert weights.shape == (9, 3)
    assert (probe_predict(weights, features) == labels).mean() > 0.95
    assert fit_probe(blocks, 1e-4).tobytes() == weights.tobytes()


def test_the_digests_a_forget_takes_from_dvc_are_the_files_own(incremental: dict, tmp_path: Path) -> None:
    """With `dvc status` clean, the md5 of each file under data/ and models/ comes from dvc.lock and the cache's
    .dir listings (no file read) and equals hashing the file; an output whose listing is missing is hashed."""
    from pipeline.runner.outputs import _recorded_digests, artifact_digests

    root = incremental["root"]
    assert "up to date" in run("dvc", "status", cwd=root)
    hashed = artifact_digests(root)
    assert len(hashed) > 20 and set(hashed) <= set(_recorded_digests(root))  # every file covered by DVC's records
    assert artifact_digests(root, clean=True) == hashed
    copy = copy_project(root, tmp_path / "p")
    listings = sorted((copy / ".dvc" / "cache" / "files" / "md5").glob("*/*.dir"))
    assert listings
    for listing in listings:
        listing.unlink()
    assert not set(hashed) <= set(_recorded_digests(copy))
    assert artifact_digests(copy, clean=True) == hashed


def test_a_forget_reads_only_its_partition_and_shards_and_writes_a_full_runs_bytes(incremental: dict,
                                                                                   tmp_path: Path) -> None:
    """One train sample removed: `assign` reads only its partition, the quality stage only the k shards it sat in
    (the others' values come from their partials), `evaluate` routes no test sample again, and the routing index,
    the shards and the quality result, tables and partials are those of a run without any kept state, byte for
    byte."""
    root = copy_project(incremental["root"], tmp_path / "p")
    n = int(yaml.safe_load((root / "params.yaml").read_text())["adapters"]["n"])
    row = read_table(root / "data/routing.parquet").iloc[0]
    rel = RAW[int(row["partition"])]
    frame = read_table(root / rel)
    write_table(frame[frame["sample_id"] != row["sample_id"]], root / rel)
    run("dvc", "add", "-q", rel, cwd=root)
    log = run("dvc", "repro", cwd=root)
    assert f"quality: read {len(row['adapters'])} of {n} shards" in log
    assert re.search(r"evaluate: routed 0 of \d+ test samples", log)  # the test split did not change
    assert len(row["adapters"]) < n
    scratch = copy_project(root, tmp_path / "scratch")
    for top in ("data/shards", "reports/quality/partials"):
        shutil.rmtree(scratch / top)
    (scratch / "data/routing.parquet").unlink()
    run("stages.assign", cwd=scratch)
    assert f"quality: read {n} of {n} shards" in run("stages.quality", cwd=scratch)
    written = ("data/shards", "data/routing.parquet", "reports/quality/result.json", "reports/quality/tables",
               "reports/quality/partials")
    ours, theirs = ({p: b for p, b in files(r).items() if p.startswith(written)} for r in (root, scratch))
    assert sum(p.startswith("reports/quality") for p in ours) == 1 + 3 + n
    assert sorted(ours) == sorted(theirs)
    assert not sorted(p for p in ours if ours[p] != theirs[p])
    partials = sorted((root / "reports/quality/partials").glob("*.parquet"))
    assert not any(row["sample_id"] in set(read_table(path)["sample_id"]) for path in partials)
