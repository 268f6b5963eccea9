"""The forget flow end to end, for real (git + DVC + MLflow SQLite + ONNX Runtime + torch; no mocks).

Issue 3's acceptance points:

* exactness oracle: a project that forgot M in several requests (one emptying an adapter, one removing a test
  sample) holds the same bytes as a fresh build on D \\ M; only the adapters the forgotten samples activated are
  retrained, and predictions of test samples routed only to untouched adapters keep their exact probabilities;
* residue: canary samples leave no trace of their ID, pixels or embedding anywhere (workspace, DVC cache, a local
  DVC remote, MLflow store and artifacts, git objects);
* bad input changes nothing; a crash in any state is finished by re-running; concurrent forgets serialise;
  tampering is detected; re-running is idempotent; dry-run changes nothing; report and check-id.

Runtime (2 cores): `exactness` is one fresh init + build with canaries, two forgets, and (in parallel with the
forgets) the from-scratch build on D \\ M. The other scenarios run on private clones of the session's
`built_project` (cheap copies with MLflow's absolute artifact paths rewritten, so a clone never touches the
original); `clone_runs` runs their forgets two at a time.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY, copy_project, init_args, legonet

from pipeline.audit.disclosure import names_adapter, root_problems
from pipeline.data.dataset import SplitFractions, read_embeddings, read_table, split_of, write_table
from pipeline.data.salt import secret_path
from pipeline.forget.flow import project_lock
from pipeline.forget.requests import load_manifest
from pipeline.model.ensemble import load_ensemble
from pipeline.model.keys import project as project_points
from pipeline.project.layout import adapter_index, adapter_info_path, adapter_path, block_of, shard_path
from pipeline.tracking.lineage import file_md5

STATES = ("quarantined", "data-removed", "rebuilt", "registered", "purged", "audited", "committed")
RECEIVED = "2024-05-01T09:30:00Z"
# Raw inputs: what the user gave (a from-scratch project is initialised from D \ M instead of forgetting).
RAW_INPUTS = ("data/raw/", "data/reference/", "data/test/")
# What MLflow writes into the package that is not a function of the model: MLmodel holds a fresh model_uuid, the
# save time and the absolute path of the package stage's temporary staging folder. Every other package file
# (weights, keys, projection, encoder, config, code, served.py, input example, environment files) must be identical.
PACKAGE_VOLATILE = ("models/package/MLmodel",)
ADAPTERS = int(TINY["adapters.n"])
BLOCKS = int(TINY["adapters.blocks"])
# The oracle runs at n = 256 (issue 6): 64 adapters per train block, so a forget retrains a few adapters of a
# block and keeps the rest. 256 keys need 256 reference samples: 30 % of the tiny data.
ORACLE = {"adapters.n": 256, "adapters.blocks": 4, "data.reference_fraction": 0.3}
ORACLE_N, ORACLE_BLOCKS = int(ORACLE["adapters.n"]), int(ORACLE["adapters.blocks"])
ORACLE_SPLITS = SplitFractions(float(ORACLE["data.reference_fraction"]), 0.2)  # test_fraction: the default


def _canaries(splits: SplitFractions) -> tuple[tuple[str, str], str]:
    """Canary IDs whose stable hash puts them in the train split (the first two) and the test split (the third)."""
    names = [f"canary-{i:03d}" for i in range(1000)]
    train = [c for c in names if split_of(c, splits) == "train"]
    return (train[0], train[1]), next(c for c in names if split_of(c, splits) == "test")


TRAIN_CANARIES, TEST_CANARY = _canaries(ORACLE_SPLITS)
CANARIES = (*TRAIN_CANARIES, TEST_CANARY)


# --- helpers ---


def write_manifest(path: Path, request_id: str, sample_ids: Iterable[str], reason: str = "GDPR Art. 17") -> Path:
    """A deletion request in the format the file extension names (.json, .yaml or .csv)."""
    ids = list(sample_ids)
    fields = {"request_id": request_id, "sample_ids": ids, "reason": reason, "received_at": RECEIVED}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(fields))
    elif path.suffix == ".yaml":
        path.write_text(yaml.safe_dump(fields))
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["sample_id", "request_id", "reason", "received_at"])
        writer.writerows([i, request_id, reason, RECEIVED] for i in ids)
        path.write_text(buffer.getvalue())
    return path


def forget(root: Path, *manifests: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `legonet forget` and return the JSON summary it prints as its last stdout line."""
    result = legonet("forget", *map(str, manifests), cwd=root, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def record(root: Path, request_id: str) -> dict[str, Any]:
    return json.loads(legonet("audit", "show", request_id, cwd=root).stdout)["predicate"]


def audit_records(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "audit" / "records").glob("*.json"))


def tree_md5(root: Path, skip: Iterable[str] = (".legonet/lock",)) -> dict[str, str]:
    """md5 of every file under ``root`` (git, DVC cache, MLflow store and all), except the ``skip`` paths; hashed
    here, not through the project's digest store, which a look must not change."""
    skipped = set(skip)
    return {rel: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and (rel := p.relative_to(root).as_posix()) not in skipped}


def artifacts_md5(root: Path) -> dict[str, str]:
    """The artifacts that decide a prediction: data/ and models/ without raw inputs, DVC pointer and .gitignore
    files, and the MLflow metadata file of the package."""
    files = [p for top in ("data", "models") for p in sorted((root / top).rglob("*")) if p.is_file()]
    rels = {p.relative_to(root).as_posix(): p for p in files}
    return {rel: file_md5(p) for rel, p in rels.items()
            if not rel.startswith(RAW_INPUTS) and not rel.endswith((".dvc", ".gitignore"))
            and rel not in PACKAGE_VOLATILE}


def lock_without_package_listing(root: Path) -> dict[str, Any]:
    """dvc.lock, without the hash of the models/package listing (it includes MLmodel, see above) and of the Data
    Docs listing (its pages carry the validation time); the quality result and tables are compared."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for out in lock["stages"]["package"]["outs"]:
        assert out["path"] == "models/package" and out.pop("md5").endswith(".dir")
    for out in lock["stages"]["quality"]["outs"]:
        if out["path"] == "reports/quality/data_docs":
            assert out.pop("md5").endswith(".dir")
            out.pop("size"), out.pop("nfiles")
    return lock


def project_params(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "params.yaml").read_text())


def split_predictions(root: Path) -> dict[str, tuple[bytes, frozenset[int]]]:
    """sample_id -> (float32 probability bytes, the adapters consulted) for every test sample."""
    params = project_params(root)
    ensemble = load_ensemble(root / "models/projection.npy", root / "models/keys.npy", root / "models/adapters",
                             int(params["adapters"]["k"]), list(params["data"]["classes"]))
    frame, embeddings = read_embeddings(root / "data/encoded/test.parquet")
    proba, activated = ensemble.predict_proba(embeddings)
    return {sid: (proba[i].tobytes(), frozenset(int(a) for a in activated[i]))
            for i, sid in enumerate(frame["sample_id"])}



def expected_stages(root: Path, routing: pd.DataFrame, test_ids: set[str], ids: Iterable[str], n: int = ADAPTERS,
                    blocks: int = BLOCKS) -> tuple[list[int], set[str]]:
    """The adapters the samples activate (from the routing index) and the DVC stages that must rerun: in DVC's
    graph of the project, every stage downstream of the raw partitions and the test split the samples are in,
    with the train blocks narrowed to those of the adapters the samples activate."""
    import networkx as nx
    from dvc.repo import Repo

    ids = set(ids)
    rows = routing[routing["sample_id"].isin(ids)]
    adapters = sorted({int(a) for row in rows["adapters"] for a in row})
    rewritten = {f"data/raw/part-{int(p):04d}.parquet" for p in rows["partition"]}
    rewritten |= {"data/test/test.parquet"} if ids & test_ids else set()
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        sources = [stage for stage in graph for out in stage.outs
                   if Path(out.fs_path).relative_to(repo.root_dir).as_posix() in rewritten]
        downstream = {stage.name for source in sources for stage in nx.ancestors(graph, source)}  # dvc.yaml's
    blocks_hit = {f"train@{block_of(j, n, blocks):04d}" for j in adapters}
    return adapters, {s for s in downstream if not s.startswith("train@") or s in blocks_hit}


# a user's stage added to dvc.yaml downstream of the data: the forget runs it (as DVC would: its command in a shell)
SUMMARY = ("summary", {"cmd": "python summarize.py", "deps": ["summarize.py", "metrics/evaluate.json"],
                       "outs": ["reports/summary.json"]}, "summarize.py", """\
import json, pathlib
accuracy = json.loads(pathlib.Path("metrics/evaluate.json").read_text())["accuracy"]
pathlib.Path("reports/summary.json").write_text(json.dumps({"accuracy": round(accuracy, 4)}) + "\\n")
""")
# one that fails while FAIL_STAGE is set, listed first in dvc.yaml (it runs once the adapters are trained)
LISTING = ("adapter-files", {"cmd": "python list_adapters.py", "deps": ["list_adapters.py", "models/adapters"],
                             "outs": ["reports/adapter-files.txt"]}, "list_adapters.py", """\
import os, pathlib, sys
if os.environ.get("FAIL_STAGE"):
    sys.exit("planted failure: FAIL_STAGE is set")
names = sorted(p.as_posix() for p in pathlib.Path("models/adapters").rglob("*.safetensors"))
pathlib.Path("reports/adapter-files.txt").write_text("\\n".join(names) + "\\n")
""")


def add_stage(root: Path, stage: tuple[str, dict[str, Any], str, str], first: bool = False) -> None:
    """Add a stage (name, definition, script name, script) to the project's dvc.yaml, its script beside it."""
    name, definition, script_name, script = stage
    (root / script_name).write_text(script)
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    doc["stages"] = {name: definition, **doc["stages"]} if first else {**doc["stages"], name: definition}
    (root / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def dvc(root: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def flip_byte(path: Path, offset: int | None = None) -> bytes:
    """Change one byte of a file (the middle one by default); returns the original bytes to restore."""
    data = path.read_bytes()
    at = len(data) // 2 if offset is None else offset
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
    return data


# --- residue scan ---


def parquet_plain(data: bytes) -> bytes:
    """A Parquet file's columns as uncompressed Arrow IPC bytes, so compressed values can be searched too."""
    try:
        table = pq.read_table(io.BytesIO(data))
    except (OSError, ValueError, pa.ArrowException):
        return b""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def scan(roots: Iterable[Path], needles: dict[str, bytes], git_root: Path | None = None) -> dict[str, list[str]]:
    """Where each needle occurs: every file under ``roots`` (Parquet files also decoded) and every git object."""
    found: dict[str, list[str]] = {name: [] for name in needles}
    blobs: list[tuple[str, bytes]] = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                blobs.append((str(path), data))
                if data[:4] == b"PAR1":
                    blobs.append((f"{path} (decoded)", parquet_plain(data)))
    if git_root is not None:
        objects = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=git_root,
                                 capture_output=True, check=True).stdout
        blobs.append((f"{git_root}/.git (all objects)", objects))
    for where, data in blobs:
        for name, needle in needles.items():
            if needle in data:
                found[name].append(where)
    return found


def canary_frame(template: pd.DataFrame) -> pd.DataFrame:
    """Three canaries: unique IDs and a unique pseudo-random pixel pattern each (not a digit anyone has)."""
    assert [split_of(c, ORACLE_SPLITS) for c in CANARIES] == ["train", "train", "test"]
    size = len(template["image"].iloc[0])
    rng = np.random.default_rng(0x7F3A9C)
    return pd.DataFrame({"sample_id": list(CANARIES), "label": [int(template["label"].iloc[0])] * len(CANARIES),
                         "image": [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in CANARIES]})


def distinctive(vector: np.ndarray) -> bytes:
    """The float32 bytes of ``vector`` from its first to its last non-zero value.

    Encoder embeddings of these tiny images are ~98% zeros (ReLU), so a fixed slice would often be all zeros and
    match any file; the non-zero span, zeros inside it included, is what only this sample's row holds.
    """
    values = np.asarray(vector, dtype=np.float32)
    nonzero = np.flatnonzero(values)
    assert len(set(values[nonzero].tolist())) >= 4, "too few distinct non-zero values to recognise the row"
    return values[nonzero[0]:nonzero[-1] + 1].tobytes()


def canary_needles(root: Path, canaries: pd.DataFrame) -> dict[str, bytes]:
    """Byte strings that only a canary's data can produce: its ID, 64 pixel bytes, its encoder embedding and
    (train canaries) its projected embedding, which the shards hold."""
    projection = np.load(root / "models/projection.npy")
    frames = [read_embeddings(p) for p in sorted((root / "data/encoded").rglob("*.parquet"))]
    needles = {}
    for sid, image in zip(canaries["sample_id"], canaries["image"], strict=True):
        found = [emb[np.flatnonzero(frame["sample_id"].to_numpy() == sid)] for frame, emb in frames]
        embedding = np.concatenate(found)
        assert embedding.shape[0] == 1, f"{sid}: expected one encoded row, found {embedding.shape[0]}"
        needles[f"{sid}: id"] = sid.encode()
        needles[f"{sid}: pixels"] = image[100:164]
        needles[f"{sid}: embedding"] = distinctive(embedding[0])
        if sid in TRAIN_CANARIES:  # shards hold projected train embeddings; test embeddings are stored raw
            needles[f"{sid}: projected embedding"] = distinctive(project_points(embedding, projection)[0])
    return needles


# --- the exactness sequence ---


@pytest.fixture(scope="module")
def exactness(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Any]:
    """Init + build on D (tiny data + canaries), push to a local DVC remote, then forget in two requests:

    1. (JSON) two train samples that activate the same adapters, chosen so that many test samples route
       elsewhere, plus one test sample;
    2. (CSV) the canaries (two train, one test) and every remaining train sample of the smallest adapter, which
       becomes empty.

    Meanwhile a second project is initialised with D \\ M and built from scratch: the oracle.
    """
    work = tmp_path_factory.mktemp("exactness")
    root, oracle, remote, requests = work / "forgot", work / "scratch", work / "remote", work / "requests"
    root.mkdir()
    oracle.mkdir()
    samples = read_table(tiny_data)
    canaries = canary_frame(samples)
    full = pd.concat([samples, canaries], ignore_index=True)
    write_table(full, work / "d.parquet")
    legonet(*init_args(work / "d.parquet", ORACLE), cwd=root)
    add_stage(root, SUMMARY)
    legonet("build", cwd=root)
    dvc(root, "remote", "add", "-d", "local", str(remote))
    dvc(root, "push", "-q")

    routing = read_table(root / "data/routing.parquet")
    test_ids = set(read_table(root / "data/test/test.parquet")["sample_id"])
    assert set(TRAIN_CANARIES) <= set(routing["sample_id"]) and TEST_CANARY in test_ids
    before = split_predictions(root)

    # request 1: the adapter set of two or more train samples that leaves the most test samples untouched
    plain = routing[~routing["sample_id"].isin(CANARIES)]
    sets = plain["adapters"].map(lambda a: frozenset(int(j) for j in a))
    untouched = {s: sum(not (s & used) for _, used in before.values())
                 for s, count in sets.value_counts().items() if count >= 2}
    chosen = max(sorted(untouched, key=sorted), key=untouched.get)
    first = sorted(plain["sample_id"][sets == chosen])[:2]
    first_test = sorted(test_ids - set(CANARIES))[0]
    m1 = [*first, first_test]
    # request 2: the smallest adapter's remaining samples (its set does not depend on the other requests:
    # routing is per sample)
    gone = set(m1) | set(CANARIES)
    rest = routing[~routing["sample_id"].isin(gone)]
    members = {j: sorted(rest["sample_id"][rest["adapters"].map(lambda a, j=j: j in set(int(x) for x in a))])
               for j in range(len(np.load(root / "models/keys.npy")))}
    emptied = min((j for j in members if members[j]), key=lambda j: (len(members[j]), j))
    m2 = [*CANARIES, *members[emptied]]
    batches = [("req-0001-pair", write_manifest(requests / "r1.json", "req-0001-pair", m1)),
               ("req-0002-canaries-and-adapter", write_manifest(requests / "r2.csv", "req-0002-canaries-and-adapter",
                                                                 m2))]
    removed = set(m1) | set(m2)

    # the oracle: a fresh project on D \ M, built while the forgets run
    write_table(full[~full["sample_id"].isin(removed)].reset_index(drop=True), work / "retained.parquet")
    scratch_error: list[BaseException] = []

    def build_scratch() -> None:
        try:
            legonet(*init_args(work / "retained.parquet", ORACLE), "--data-secret", str(secret_path(root)), cwd=oracle)
            add_stage(oracle, SUMMARY)
            legonet("build", cwd=oracle)
        except BaseException as exc:  # re-raised in the main thread
            scratch_error.append(exc)

    builder = threading.Thread(target=build_scratch)
    builder.start()
    needles = canary_needles(root, canaries)
    scan_roots = [root, remote]
    residue_before = scan(scan_roots, needles, root)

    steps = []
    for request_id, manifest in batches:
        routing_now = read_table(root / "data/routing.parquet")
        tests_now = set(read_table(root / "data/test/test.parquet")["sample_id"])
        ids = set(load_manifest(manifest).sample_ids)
        adapters, stages = expected_stages(root, routing_now, tests_now, ids, ORACLE_N, ORACLE_BLOCKS)
        predictions = split_predictions(root)
        summary = forget(root, manifest)
        steps.append({"request_id": request_id, "ids": ids, "adapters": adapters, "stages": stages,
                      "summary": summary, "record": record(root, request_id), "status": dvc(root, "status"),
                      "before": predictions, "after": split_predictions(root)})
    builder.join()
    if scratch_error:
        raise scratch_error[0]
    return {"root": root, "oracle": oracle, "remote": remote, "steps": steps, "removed": removed,
            "emptied": emptied, "needles": needles, "residue_before": residue_before,
            "residue_after": scan(scan_roots, needles, root)}


def test_forget_equals_a_from_scratch_build_on_the_retained_data(exactness: dict[str, Any]) -> None:
    """THE oracle: every artifact that decides a prediction is bit-identical to a fresh build on D \\ M."""
    forgot, scratch = artifacts_md5(exactness["root"]), artifacts_md5(exactness["oracle"])
    assert sorted(forgot) == sorted(scratch)
    assert len(forgot) > 20 and any(p.startswith("models/package/") for p in forgot)
    differ = sorted(p for p in forgot if forgot[p] != scratch[p])
    assert not differ, f"artifacts differ from the from-scratch build on D \\ M: {differ}"
    # the raw inputs too: the retained rows, carved by hash, written byte-deterministically
    raw = [p.relative_to(exactness["root"]).as_posix() for p in (exactness["root"] / "data").rglob("*.parquet")
           if p.relative_to(exactness["root"]).as_posix().startswith(RAW_INPUTS)]
    assert raw and all(file_md5(exactness["root"] / p) == file_md5(exactness["oracle"] / p) for p in raw)
    # and the package's MLmodel differs only in MLflow's own bookkeeping
    mlmodels = [yaml.safe_load((r / PACKAGE_VOLATILE[0]).read_text()) for r in (exactness["root"],
                                                                                   exactness["oracle"])]
    for doc in mlmodels:
        doc.pop("model_uuid")
        doc.pop("utc_time_created")
        for artifact in doc["flavors"]["python_function"]["artifacts"].values():
            artifact.pop("uri")
    assert mlmodels[0] == mlmodels[1]
    # dvc.lock too: same params, same dependency and output digests
    assert lock_without_package_listing(exactness["root"]) == lock_without_package_listing(exactness["oracle"])
    # one adapter is now empty, in both projects, and the ensemble skips it
    emptied = adapter_info_path(exactness["emptied"], ORACLE_N, ORACLE_BLOCKS)
    info = json.loads((exactness["root"] / emptied).read_text())
    assert info["train_samples"] == 0
    assert not (set(read_table(exactness["root"] / "data/routing.parquet")["sample_id"]) & exactness["removed"])


def test_a_stage_added_downstream_of_the_data_is_run_by_the_forget(exactness: dict[str, Any]) -> None:
    """A user's stage in dvc.yaml (not a legonet entry point) that reads the evaluation metrics: each forget runs
    it, `dvc status` is clean afterwards, and its output is the fresh build's."""
    for step in exactness["steps"]:
        assert "summary" in step["record"]["stages_run"] and "summary" in step["stages"], step["request_id"]
        assert "up to date" in step["status"], step["status"]
    forgot, scratch = (exactness[name] / "reports/summary.json" for name in ("root", "oracle"))
    assert forgot.read_bytes() == scratch.read_bytes()
    assert json.loads(forgot.read_text())["accuracy"] == round(
        json.loads((exactness["root"] / "metrics/evaluate.json").read_text())["accuracy"], 4)


def test_only_the_activated_adapters_are_retrained(exactness: dict[str, Any]) -> None:
    for step in exactness["steps"]:
        summary, predicate = step["summary"], step["record"]
        assert summary["status"] == "forgotten" and summary["request_ids"] == [step["request_id"]]
        assert summary["retrained_adapters"] == step["adapters"], step["request_id"]
        assert set(predicate["stages_run"]) == step["stages"], step["request_id"]
        assert predicate["affected"]["adapters"] == step["adapters"]
        assert all(check["passed"] for check in predicate["checks"]) and len(predicate["checks"]) == 3
        assert predicate["status"] == "forgotten" and len(predicate["forgotten_ids"]) == len(step["ids"])
        # the sealed fields, opened by `audit show`: the retrained adapters' files changed, and their audit paths
        # take the published before root to the after root, so no other adapter file did
        changed = sorted(p for p in predicate["artifacts"] if names_adapter(p))
        assert sorted(predicate["opened_adapter_proofs"]) == changed and not root_problems({"predicate": predicate})
        assert {adapter_index(Path(p)) for p in changed if p.startswith("models/adapters/")} == set(step["adapters"])
    emptying = exactness["steps"][-1]
    assert exactness["emptied"] in emptying["adapters"]


def test_predictions_of_untouched_regions_are_bit_identical(exactness: dict[str, Any]) -> None:
    """Test samples whose k adapters were all left alone keep their exact probabilities; the others move."""
    for index, step in enumerate(exactness["steps"]):
        retrained = set(step["adapters"])
        kept = sorted(set(step["before"]) & set(step["after"]))
        assert set(step["before"]) - set(step["after"]) == step["ids"] & set(step["before"])
        untouched = [s for s in kept if not step["before"][s][1] & retrained]
        if index == 0:
            assert len(untouched) >= 5, "request 1 was chosen to leave test samples untouched"
        changed = [s for s in untouched if step["before"][s] != step["after"][s]]
        assert not changed, f"{step['request_id']}: untouched test samples changed: {changed[:5]}"


def test_no_residue_of_canaries_anywhere(exactness: dict[str, Any]) -> None:
    """ID, pixel and embedding bytes of the canaries: present before (the scan works), gone after."""
    before, after = exactness["residue_before"], exactness["residue_after"]
    root, remote = str(exactness["root"]), str(exactness["remote"])
    for name, places in before.items():
        assert places, f"{name}: not found before forgetting; the scan would prove nothing"
        assert all("(decoded)" in p or "/files/md5/" in p or p.endswith(".parquet") for p in places), \
            f"{name}: found outside data tables, so the needle is not specific to the canary: {places}"
        if name.endswith(": id") or name.endswith(": pixels"):
            assert any(p.startswith(f"{root}/.dvc/cache") for p in places), name
            assert any(p.startswith(remote) for p in places), name
    leftovers = {name: places for name, places in after.items() if places}
    assert not leftovers, f"canary residue after forgetting: {leftovers}"


def test_a_forget_marks_the_state_it_leaves_clean(exactness: dict[str, Any]) -> None:
    """The mark that lets the next plan skip hashing every ID names the data and log this forget left."""
    from pipeline.audit.record import forgotten_lookup
    from pipeline.forget import flow
    from pipeline.project.params import load_params

    root = exactness["root"]
    head = forgotten_lookup(root, load_params(root)).head
    assert (root / flow.CLEAN).read_text() == flow.clean_key(root, head)
    assert flow.clean_key(root, head) != flow.clean_key(root, "another log")


def test_tampering_is_detected(exactness: dict[str, Any], tmp_path: Path) -> None:
    """One changed byte of an adapter, a shard or a record, a missing middle record, or a forgotten sample back in
    the DVC remote: `legonet audit verify` fails naming it."""
    root = exactness["root"]
    # a third record, so that one is in the middle (a request of forgotten IDs: recorded, nothing rebuilt)
    assert forget(root, write_manifest(tmp_path / "again.json", "req-0003-again", CANARIES))["status"] == \
        "already-forgotten"
    assert legonet("audit", "verify", cwd=root).returncode == 0
    records = sorted((root / "audit/records").glob("*.json"))
    assert len(records) == 3
    j = 1 if exactness["emptied"] == 0 else 0
    adapter, shard = (adapter_path(j, ORACLE_N, ORACLE_BLOCKS).as_posix(),
                      shard_path(j, ORACLE_N, ORACLE_BLOCKS).as_posix())
    payload_at = records[1].read_bytes().index(b'"payload":"') + 40
    cases = [(root / adapter, None, adapter), (root / shard, None, shard), (records[1], payload_at, records[1].name)]
    for path, offset, name in cases:
        original = flip_byte(path, offset)
        try:
            result = legonet("audit", "verify", cwd=root, check=False)
        finally:
            path.write_bytes(original)
        assert result.returncode == 9, f"{name}: tampering not detected:\n{result.stdout}{result.stderr}"
        assert name in result.stderr and "Traceback" not in result.stderr, result.stderr
    middle = records[1].read_bytes()
    records[1].unlink()
    try:
        result = legonet("audit", "verify", cwd=root, check=False)
    finally:
        records[1].write_bytes(middle)
    assert result.returncode == 9 and records[2].name in result.stderr, result.stderr
    assert "missing" in result.stderr and "chain broken" in result.stderr, result.stderr
    # a forgotten sample put back into the DVC remote (e.g. pushed from a stale clone): an object of the project's
    # history that a forget purged (an object no commit references is another project's, never this one's residue)
    purged = sorted(d for d in json.loads((root / ".legonet/purged.json").read_text()) if not d.endswith(".dir"))
    stale = exactness["remote"] / "files" / "md5" / purged[0][:2] / purged[0][2:]
    stale.parent.mkdir(parents=True, exist_ok=True)
    write_table(pd.DataFrame({"sample_id": [TRAIN_CANARIES[0]], "label": [0]}), stale)
    try:
        result = legonet("audit", "verify", cwd=root, check=False)
    finally:
        stale.unlink()
    assert result.returncode == 9 and str(stale) in result.stderr and "req-0002" in result.stderr, result.stderr
    assert legonet("audit", "verify", cwd=root).returncode == 0


# --- scenarios on clones of the session's built project ---


@pytest.fixture(scope="module")
def idle_project(tmp_path_factory: pytest.TempPathFactory, built_project: Path) -> Path:
    """A clone that only sees commands which must change nothing."""
    return copy_project(built_project, tmp_path_factory.mktemp("idle") / "project")


def _bad_manifests(root: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (manifest, a phrase the error message must hold)."""
    train = sorted(read_table(root / "data/routing.parquet")["sample_id"])
    reference = sorted(read_table(root / "data/reference/reference.parquet")["sample_id"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "malformed.json").write_text('{"request_id": "r-1", "sample_ids": ["' + train[0] + '"],')
    (folder / "malformed.yaml").write_text("request_id: r-1\nsample_ids: [" + train[0] + "\nreason: x\n")
    (folder / "malformed.csv").write_text("sample_id,request_id,reason,received_at\n"
                                          f"{train[0]},r-1,GDPR,{RECEIVED},extra\n")
    return {
        "malformed JSON": (folder / "malformed.json", "malformed JSON"),
        "malformed YAML": (folder / "malformed.yaml", "malformed YAML"),
        "malformed CSV": (folder / "malformed.csv", "line 2 has 5 field(s)"),
        "empty sample_ids": (write_manifest(folder / "empty.json", "r-1", []), "sample_ids is empty"),
        "duplicate IDs": (write_manifest(folder / "dup.yaml", "r-1", [train[0], train[1], train[0]]),
                          "duplicate sample ID"),
        "unknown IDs": (write_manifest(folder / "unknown.json", "r-1", [train[0], "nobody-00001"]),
                        "not in this project"),
        "reference ID": (write_manifest(folder / "reference.csv", "r-1", [train[0], reference[0]]),
                         "reference split"),
        "path for an ID": (write_manifest(folder / "path.json", "r-1", ["data/raw/part-0000.parquet"]),
                           "looks like a path"),
    }


BAD = ("malformed JSON", "malformed YAML", "malformed CSV", "empty sample_ids", "duplicate IDs", "unknown IDs",
       "reference ID", "path for an ID")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_changes_nothing(idle_project: Path, tmp_path: Path, case: str) -> None:
    manifest, phrase = _bad_manifests(idle_project, tmp_path)[case]
    before = tree_md5(idle_project)
    result = legonet("forget", str(manifest), cwd=idle_project, check=False)
    assert result.returncode == 3, f"{case}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    message = result.stderr.strip()
    assert message.startswith("error:") and message.count("error") == 1 and len(message.splitlines()) == 1, message
    assert phrase in message and "Traceback" not in message, message
    assert result.stdout == ""
    assert tree_md5(idle_project) == before, f"{case}: the project changed"


def test_no_wait_fails_fast_while_another_forget_holds_the_lock(idle_project: Path, tmp_path: Path) -> None:
    sample = sorted(read_table(idle_project / "data/routing.parquet")["sample_id"])[0]
    manifest = write_manifest(tmp_path / "m.json", "r-busy", [sample])
    before = tree_md5(idle_project)
    with project_lock(idle_project, wait=False, notify=print):
        result = legonet("forget", "--no-wait", str(manifest), cwd=idle_project, check=False)
    assert result.returncode == 7, result.stderr
    assert "another forget is running" in result.stderr and f"pid {os.getpid()}" in result.stderr, result.stderr
    assert tree_md5(idle_project) == before


@pytest.fixture(scope="module")
def small_request(built_project: Path) -> list[str]:
    """One train sample and one test sample of the built project."""
    train = sorted(read_table(built_project / "data/routing.parquet")["sample_id"])
    test = sorted(read_table(built_project / "data/test/test.parquet")["sample_id"])
    return [train[len(train) // 2], test[len(test) // 2]]


@pytest.fixture(scope="module")
def clone_runs(tmp_path_factory: pytest.TempPathFactory, built_project: Path,
               small_request: list[str]) -> dict[str, Any]:
    """Every forget that runs on a clone of the built project, two at a time (one process per core).

    * plain: a dry run, then the small request, uninterrupted;
    * chain: the same request killed after every state in turn (each re-run resumes and is killed after the next
      state), then re-run to the end;
    * once: the same request killed right after data-removed, then re-run once;
    * concurrent: two requests started at the same moment (one of them waits for the lock, so this job uses
      about one core);
    * failed: the same request in a project with a stage of its own downstream of the adapters (``LISTING``), which
      fails (after the training) while FAIL_STAGE is set, then re-run as it should be.
    """
    work = tmp_path_factory.mktemp("clones")
    manifest = write_manifest(work / "requests" / "x.json", "req-x", small_request)
    names = ("concurrent", "plain", "chain", "once", "failed")
    projects = {name: copy_project(built_project, work / name) for name in names}

    def concurrent() -> dict[str, Any]:
        root = projects["concurrent"]
        train = sorted(set(read_table(root / "data/routing.parquet")["sample_id"]) - set(small_request))[:2]
        manifests = [write_manifest(work / "requests" / f"c{i}.json", f"req-c{i}", [sid])
                     for i, sid in enumerate(train)]
        processes = [subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "forget", str(m)], cwd=root,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for m in manifests]
        outputs = [p.communicate(timeout=1200) for p in processes]
        return {"ids": train, "returncodes": [p.returncode for p in processes], "outputs": outputs}

    def plain() -> dict[str, Any]:
        root = projects["plain"]
        digests = tree_md5(root)
        dry = legonet("forget", "--dry-run", str(manifest), cwd=root)
        out = {"dry_run": dry, "dry_run_unchanged": tree_md5(root) == digests,
               "routing": read_table(root / "data/routing.parquet"),
               "test_ids": set(read_table(root / "data/test/test.parquet")["sample_id"])}
        out["summary"] = forget(root, manifest)
        return out

    def crashed(name: str, states: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        runs = [legonet("forget", str(manifest), cwd=projects[name], check=False, env={"LEGONET_CRASH_AFTER": s})
                for s in states]
        return [*runs, legonet("forget", str(manifest), cwd=projects[name])]

    def failed() -> dict[str, Any]:
        root = projects["failed"]
        add_stage(root, LISTING, first=True)
        legonet("build", cwd=root)
        lock = (root / "dvc.lock").read_bytes()
        broken = legonet("forget", str(manifest), cwd=root, check=False, env={"FAIL_STAGE": "1"})
        return {"broken": broken, "lock_kept": (root / "dvc.lock").read_bytes() == lock,
                "rerun": legonet("forget", str(manifest), cwd=root)}

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {"concurrent": pool.submit(concurrent), "plain": pool.submit(plain),
                "chain": pool.submit(crashed, "chain", STATES), "once": pool.submit(crashed, "once", STATES[:1]),
                "failed": pool.submit(failed)}
        results = {name: job.result() for name, job in jobs.items()}
    return {"manifest": manifest, "projects": projects, "ids": small_request,
            "final": {name: (artifacts_md5(root), lock_without_package_listing(root), audit_records(root))
                      for name, root in projects.items()}, **results}


def test_dry_run_changes_nothing_and_names_adapters_and_stages(clone_runs: dict[str, Any]) -> None:
    adapters, stages = expected_stages(clone_runs["projects"]["plain"], clone_runs["plain"]["routing"],
                                       clone_runs["plain"]["test_ids"], clone_runs["ids"])
    dry = clone_runs["plain"]["dry_run"]
    summary = json.loads(dry.stdout.strip().splitlines()[-1])
    assert summary["status"] == "dry-run" and summary["adapters"] == adapters and set(summary["stages"]) == stages
    assert f"adapters retrained: {adapters}" in dry.stderr and "stages: " in dry.stderr
    assert all(stage in dry.stderr for stage in stages)
    assert clone_runs["plain"]["dry_run_unchanged"], "`legonet forget --dry-run` changed the project"
    assert clone_runs["plain"]["summary"]["retrained_adapters"] == adapters


def test_a_crash_in_any_state_is_finished_by_rerunning(clone_runs: dict[str, Any]) -> None:
    assert [r.returncode for r in clone_runs["chain"]] == [-signal.SIGKILL] * len(STATES) + [0]
    assert [r.returncode for r in clone_runs["once"]] == [-signal.SIGKILL, 0]
    for runs in (clone_runs["chain"], clone_runs["once"]):
        assert "resuming the forget of req-x" in runs[1].stderr
        assert json.loads(runs[-1].stdout.strip().splitlines()[-1])["status"] == "forgotten"
    plain_artifacts, plain_lock, _ = clone_runs["final"]["plain"]
    for name in ("chain", "once"):
        artifacts, lock, records = clone_runs["final"][name]
        moved = sorted(p for p in set(artifacts) | set(plain_artifacts) if artifacts.get(p) != plain_artifacts.get(p))
        assert not moved, f"{name}: differs from the uninterrupted forget: {moved}"
        assert lock == plain_lock
        assert records == ["000001-req-x.json"]
        root = clone_runs["projects"][name]
        assert not (root / ".legonet/journal.json").exists()
        assert legonet("audit", "verify", cwd=root).returncode == 0
        assert not (set(read_table(root / "data/routing.parquet")["sample_id"]) & set(clone_runs["ids"]))


def test_a_stage_that_fails_mid_forget_commits_nothing_and_a_rerun_finishes(clone_runs: dict[str, Any]) -> None:
    """A stage of the forget's rebuild fails (here a stage of the project's own, after the training ran): the
    command exits with the build error naming the stage and its own message, dvc.lock is as before, and the same
    command re-run finishes with the bytes of an uninterrupted forget."""
    run = clone_runs["failed"]
    assert run["broken"].returncode == 5, run["broken"].stderr
    assert "stage adapter-files failed" in run["broken"].stderr and "planted failure" in run["broken"].stderr
    assert run["lock_kept"], "dvc.lock changed although the rebuild failed"
    assert "resuming the forget of req-x from state 'data-removed'" in run["rerun"].stderr
    artifacts, lock, records = clone_runs["final"]["failed"]
    plain_artifacts, plain_lock, _ = clone_runs["final"]["plain"]
    assert lock["stages"].pop(LISTING[0])["cmd"] == LISTING[1]["cmd"]
    assert artifacts == plain_artifacts and lock == plain_lock and records == ["000001-req-x.json"]
    listing = (clone_runs["projects"]["failed"] / "reports/adapter-files.txt").read_text().split()
    assert listing == sorted(p for p in artifacts if p.startswith("models/adapters/") and p.endswith(".safetensors"))
    assert "up to date" in subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=clone_runs["projects"]["failed"],
                                          capture_output=True, text=True, check=True).stdout


def test_the_stage_worker_reports_a_failing_stage_and_a_dead_worker(tmp_path: Path) -> None:
    """The forget's second process (pipeline.runner.worker.StageWorker) hands back a stage's own error and a function's
    result or exception, and a worker that died is a build error, not a hang."""
    from pipeline.data.quality import norm_range, read_norm_bounds
    from pipeline.errors import DataError, StageFailed, WorkerFailed
    from pipeline.runner.worker import StageWorker

    worker = StageWorker(tmp_path, ["stages.quality"])
    try:
        worker.start("stages.quality", [])  # no project here: the stage's own ParamsError
        with pytest.raises(StageFailed, match=r"params\.yaml: not found"):
            worker.result()
        assert worker.call(norm_range, {"samples": 2, "min": 1.0, "max": 3.0}, margin=0.25) == (0.5, 3.5)
        with pytest.raises(DataError, match=r"missing\.json: missing"):  # the function's own exception, as here
            worker.call(read_norm_bounds, tmp_path / "missing.json")
        worker._process.kill()
        worker._process.join()
        with pytest.raises(WorkerFailed, match="ended unexpectedly"):
            worker.start("stages.quality", [])
            worker.result()
    finally:
        worker.close()
    assert not worker._process.is_alive()


def test_the_stage_worker_is_ready_after_its_imports_and_reports_spans_on_this_clock(tmp_path: Path) -> None:
    """The worker says when its imports are done (``pipeline.runner.lanes`` hands it other stages only then); the
    span it reports is on the clock of this process, so overlapping train stages of both processes count once in
    the training time (``_covered``)."""
    from pipeline.data.quality import norm_range
    from pipeline.runner.build import _covered
    from pipeline.runner.worker import StageWorker

    worker = StageWorker(tmp_path, [], ["pipeline.data.quality"])
    try:
        deadline = time.monotonic() + 120
        while not worker.ready():
            assert time.monotonic() < deadline, "the worker never finished its imports"
            time.sleep(0.05)
        sent = time.monotonic()
        worker.start(norm_range.__module__, [{"samples": 2, "min": 1.0, "max": 3.0}], "norm_range", margin=0.25)
        value, (start, end), imports = worker.result()
        assert value == (0.5, 3.5) and sent <= start <= end <= time.monotonic() and imports is not None
        assert worker.call(norm_range, {"samples": 2, "min": 1.0, "max": 3.0}, margin=0.0) == (1.0, 3.0)
    finally:
        worker.close()
    assert _covered([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]) == 4.0
    assert _covered([]) == 0.0


def test_rerunning_is_idempotent(clone_runs: dict[str, Any], tmp_path: Path) -> None:
    root, manifest = clone_runs["projects"]["plain"], clone_runs["manifest"]
    lock = (root / "dvc.lock").read_bytes()
    before = tree_md5(root)
    again = legonet("forget", str(manifest), cwd=root)
    assert "already forgotten" in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "already-forgotten"
    assert tree_md5(root) == before, "re-running a finished request changed the project"
    # a new request holding only IDs forgotten before: recorded as such, nothing retrained
    artifacts = artifacts_md5(root)
    summary = forget(root, write_manifest(tmp_path / "y.yaml", "req-y", clone_runs["ids"]))
    assert summary["status"] == "already-forgotten" and summary["retrained_adapters"] == []
    predicate = record(root, "req-y")
    assert predicate["status"] == "already-forgotten" and predicate["stages_run"] == []
    assert len(predicate["already_forgotten_ids"]) == 2 and predicate["forgotten_ids"] == []
    assert (root / "dvc.lock").read_bytes() == lock and artifacts_md5(root) == artifacts
    assert audit_records(root) == ["000001-req-x.json", "000002-req-y.json"]


def test_report_and_check_id(clone_runs: dict[str, Any], tmp_path: Path) -> None:
    root = clone_runs["projects"]["plain"]
    out = tmp_path / "report.html"
    legonet("audit", "report", "--output", str(out), cwd=root)
    assert "req-x" in out.read_text() and out.read_text().startswith("<!doctype html>")
    found = legonet("audit", "check-id", clone_runs["ids"][0], cwd=root)
    assert "forgotten by request req-x" in found.stdout
    kept = sorted(read_table(root / "data/routing.parquet")["sample_id"])[0]
    missing = legonet("audit", "check-id", kept, cwd=root, check=False)
    assert missing.returncode == 1 and "no forget request" in missing.stdout


def test_concurrent_forgets_are_serialised(clone_runs: dict[str, Any]) -> None:
    """Two forgets at once: one waits for the lock; both end applied, each audited once."""
    root, run = clone_runs["projects"]["concurrent"], clone_runs["concurrent"]
    assert run["returncodes"] == [0, 0], run["outputs"]
    assert sum("waiting for the project lock" in err for _, err in run["outputs"]) == 1, run["outputs"]
    assert all(json.loads(out.strip().splitlines()[-1])["status"] == "forgotten" for out, _ in run["outputs"])
    names = audit_records(root)
    assert len(names) == 2 and {n.split("-", 1)[1] for n in names} == {"req-c0.json", "req-c1.json"}
    assert not (set(read_table(root / "data/routing.parquet")["sample_id"]) & set(run["ids"]))
    assert legonet("audit", "verify", cwd=root).returncode == 0
