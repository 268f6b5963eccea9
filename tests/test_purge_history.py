"""Purge by provenance across the project's whole history (issue 21), for real: git + DVC + MLflow SQLite + torch.

One tiny project with canaries, its DVC cache outside the project (``cache.dir`` in .dvc/config.local, as a team
sharing a cache sets it) and a local DVC remote, gets three builds with different ``adapters.train.weight_decay``:
the first on the default branch, the second only on the branch ``side``, the third only on the tag ``v3``. Another
project's Parquet object holding a canary ID sits in the shared cache and the shared remote. Back on the default
branch, the canaries are forgotten. Then:

* no object of any build derived from a canary remains in the cache or the remote: no canary byte (ID, pixels,
  embeddings) in any object, and no object the provenance oracle below derives from a canary;
* every object of the three builds the oracle does not derive from a canary is still there, and so is the other
  project's object;
* the record names the shared cache and counts what it purged there; `legonet status` on the tag says which
  request purged its objects.

The oracle is this test's own reading of each build's dvc.lock: sample tables hold a canary or not; an adapter
block is derived from a canary when a shard of its block held one; evaluation, probe, quality and package outputs
of a build are derived from a canary when any of its shards or test tables held one.

A crafted ``.dir`` listing and a planted link in the cache delete nothing outside the store (no build needed).

Runtime (2 cores): one build, two adapter-only rebuilds, one forget.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import init_args, legonet
from test_forget import CANARIES, canary_frame, canary_needles, dvc, forget, parquet_plain, record, write_manifest

from pipeline.data.dataset import read_table, write_table
from pipeline.purge import history as history_module
from pipeline.purge.history import ObjectIndex, plan_purge
from pipeline.purge.objects import Stores, dvc_cache, object_path, purge_objects, referenced_objects
from pipeline.runner.outputs import lock_outputs

BUILDS = {"side": "0.001", "v3": "0.01"}  # the later builds' refs -> their weight_decay (the first: the default)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def build_with(root: Path, weight_decay: str) -> None:
    params = root / "params.yaml"
    text = params.read_text()
    old = next(line for line in text.splitlines() if line.strip().startswith("weight_decay:"))
    params.write_text(text.replace(old, f"    weight_decay: {weight_decay}"))
    legonet("build", cwd=root)


def store_objects(store: Path) -> dict[str, bytes]:
    """digest -> content of every object under a DVC 3 store."""
    return {p.parent.name + p.name: p.read_bytes() for p in (store / "files" / "md5").glob("*/*") if p.is_file()}


def parquet_ids(data: bytes) -> set[str]:
    import io

    import pyarrow.parquet as pq

    if data[:4] != b"PAR1" or "sample_id" not in pq.read_schema(io.BytesIO(data)).names:
        return set()
    return set(pq.read_table(io.BytesIO(data), columns=["sample_id"]).column(0).to_pylist())


def oracle(locks: list[dict[str, Any]], objects: dict[str, bytes], workspace: set[str]) -> tuple[set[str], set[str]]:
    """(derived, clean): the file objects of the builds that are / are not derived from a canary, by this test's
    own reading of the pipeline (see the module docstring). Bytes a build also wrote without a canary (the
    package's copy of the encoder or of an untouched adapter) are clean; what the workspace references is kept."""
    def files(out: dict[str, Any]) -> list[str]:
        if out["md5"].endswith(".dir"):
            return [e["md5"] for e in json.loads(objects[out["md5"]])]
        return [out["md5"]]

    held, derived, clean = set(), set(), set()
    for lock in locks:
        stages = lock["stages"]
        outs = {name: [md5 for out in stage.get("outs", []) for md5 in files(out) if md5 in objects]
                for name, stage in stages.items()}
        held |= {md5 for found in outs.values() for md5 in found if set(CANARIES) & parquet_ids(objects[md5])}
        shard_listing = next(o for o in stages["assign"]["outs"] if o["path"] == "data/shards")
        shards = {e["relpath"]: e["md5"] for e in json.loads(objects[shard_listing["md5"]])}
        tainted = any(md5 in held for md5 in [*shards.values(), *outs["encode@test"]])
        for name, found in outs.items():
            if name.startswith("train@"):
                block = stages[name]["deps"][0]["path"].removeprefix("data/shards/")  # block-NNNN
                bad = any(md5 in held for rel, md5 in shards.items() if rel.startswith(block + "/"))
            else:
                bad = tainted and name in ("evaluate", "baseline", "quality", "package")
            (derived if bad else clean).update(found)
    return (held | (derived - clean)) - workspace, clean - held


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("history")
    root, shared, remote = work / "project", work / "shared-cache", work / "shared-remote"
    root.mkdir()
    samples = read_table(tiny_data)
    canaries = canary_frame(samples)
    write_table(pd.concat([samples, canaries], ignore_index=True), work / "d.parquet")
    legonet(*init_args(work / "d.parquet"), cwd=root)
    # the cache moved out of the project (init's `dvc add` filled .dvc/cache), set in config.local
    dvc(root, "config", "--local", "cache.dir", os.path.relpath(shared, root))  # as typed; DVC stores it from .dvc/
    shutil.move(root / ".dvc" / "cache", shared)
    dvc(root, "remote", "add", "-d", "shared", str(remote))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "the shared remote")
    legonet("build", cwd=root)
    dvc(root, "push", "-q")
    trunk = git(root, "rev-parse", "--abbrev-ref", "HEAD").strip()
    git(root, "checkout", "-q", "-b", "side")
    build_with(root, BUILDS["side"])
    dvc(root, "push", "-q")
    git(root, "checkout", "-q", "-b", "scratch")
    build_with(root, BUILDS["v3"])
    dvc(root, "push", "-q")
    git(root, "tag", "v3")
    git(root, "checkout", "-q", trunk)
    git(root, "branch", "-q", "-D", "scratch")  # the third build is reachable from the tag only
    dvc(root, "checkout", "-q")
    # another project's table holding a canary ID, in the shared cache and on the shared remote
    other = work / "other.parquet"
    write_table(pd.DataFrame({"sample_id": [CANARIES[0], "theirs-1"], "label": [1, 2]}), other)
    other_md5 = hashlib.md5(other.read_bytes()).hexdigest()
    for store in (shared, remote):
        object_path(store, other_md5).parent.mkdir(parents=True, exist_ok=True)
        object_path(store, other_md5).write_bytes(other.read_bytes())

    locks = {ref: yaml.safe_load(git(root, "show", f"{ref}:dvc.lock")) for ref in [trunk, *BUILDS]}
    before = {"cache": store_objects(shared), "remote": store_objects(remote)}
    assert not (root / ".dvc" / "cache").exists(), "DVC used the configured cache, not .dvc/cache"
    assert dvc_cache(root) == shared.resolve()
    needles = canary_needles(root, canaries)
    manifest = write_manifest(work / "canaries.json", "req-history", CANARIES)
    summary = forget(root, manifest)
    derived, clean = oracle(list(locks.values()), {**before["cache"], **before["remote"]},
                            referenced_objects(root, shared))
    git(root, "checkout", "-q", "v3")
    status = legonet("status", cwd=root, check=False)
    git(root, "checkout", "-q", trunk)
    return {"root": root, "shared": shared, "remote": remote, "other": other_md5, "needles": needles,
            "before": before, "after": {"cache": store_objects(shared), "remote": store_objects(remote)},
            "derived": derived, "clean": clean, "locks": locks, "summary": summary,
            "record": record(root, "req-history"),
            "status": status.stdout + status.stderr}


def test_the_builds_differ_and_the_canaries_were_in_every_store(history: dict[str, Any]) -> None:
    """The scenario is what it claims: three builds with different adapters, canary bytes in both stores."""
    adapters = {ref: lock["stages"]["train@0000"]["outs"][0]["md5"] for ref, lock in history["locks"].items()}
    assert len(set(adapters.values())) == 3, adapters
    for store in ("cache", "remote"):
        for name, needle in history["needles"].items():
            assert any(needle in data or needle in parquet_plain(data) for data in history["before"][store].values()
                       ), f"{name} not in the {store} before the forget"
    assert history["derived"] and history["clean"]


def test_no_canary_byte_in_any_object_of_the_shared_cache_or_remote(history: dict[str, Any]) -> None:
    other = history["other"]
    for store in ("cache", "remote"):
        for md5, data in history["after"][store].items():
            if md5 == other:
                continue
            plain = data + parquet_plain(data)
            hits = [name for name, needle in history["needles"].items() if needle in plain]
            assert not hits, f"{store} object {md5} still holds {hits}"


def test_every_object_derived_from_a_canary_is_gone_and_every_other_remains(history: dict[str, Any]) -> None:
    """Digest check, over the three builds (default branch, branch, tag), against the oracle."""
    for store in ("cache", "remote"):
        after = history["after"][store]
        left = sorted(history["derived"] & set(after))
        assert not left, f"{store}: objects derived from a canary remain: {left[:5]}"
        lost = sorted(md5 for md5 in history["clean"] if md5 in history["before"][store] and md5 not in after)
        assert not lost, f"{store}: objects not derived from a canary were deleted: {lost[:5]}"


def test_another_projects_table_holding_the_id_is_untouched(history: dict[str, Any]) -> None:
    for store in ("cache", "remote"):
        assert history["other"] in history["after"][store]


def test_the_record_counts_the_shared_cache_and_the_history(history: dict[str, Any]) -> None:
    purge = history["record"]["purge"]
    cache = purge["dvc"]["cache"]
    assert Path(cache["store"]).resolve() == history["shared"].resolve()
    assert cache["deleted_objects"] == len(set(history["before"]["cache"]) - set(history["after"]["cache"])) > 0
    assert cache["history"]["objects"] > 0 and cache["superseded"]["objects"] > 0
    assert cache["history"]["objects"] + cache["superseded"]["objects"] == cache["deleted_objects"]
    assert len(cache["history"]["merkle_root"]) == 64
    assert purge["dvc_doomed"]["history"]["objects"] >= cache["history"]["objects"]
    purged = json.loads((history["root"] / ".legonet" / "purged.json").read_text())
    assert set(history["before"]["cache"]) - set(history["after"]["cache"]) <= set(purged)
    assert all(requests == ["req-history"] for requests in purged.values())


def test_status_on_an_old_commit_names_the_request(history: dict[str, Any]) -> None:
    assert "models/package: purged by request req-history" in history["status"], history["status"]


def test_audit_verify_passes_after_the_forget(history: dict[str, Any]) -> None:
    """verify scans only this project's objects: the other project's table in the shared stores is not residue."""
    result = legonet("audit", "verify", cwd=history["root"], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_later_forget_reads_only_the_history_added_since(history: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The purge's history memo (issue 24: the soak's purge grew with every forget). After the forget, a plan
    for more samples reads no git document again, and the runs it remembers doom exactly what the whole history's
    runs doom (with nothing kept by the workspace, so that there is something to doom); it leaves out the runs
    whose every output the forget purged, and the purged objects are not looked for in the stores again. A memo
    naming a document the history no longer has is not trusted."""
    root = history["root"]
    stores = Stores(root)
    index = ObjectIndex(root, stores)
    full = history_module.history_runs(root, stores.cache, index, remembered=False)
    remembered = history_module.history_runs(root, stores.cache, index)
    assert index.gone and remembered == {run for run in full if not run[1] <= index.gone}
    assert len(remembered) < len(full), "the forget purged every output of some runs"
    asked: list[str] = []
    monkeypatch.setattr(stores, "read", lambda md5: asked.append(md5))  # a spy: a purged file is not looked for
    assert all(index.entry(md5) is None for md5 in index.gone if not md5.endswith(".dir")) and asked == []
    monkeypatch.undo()

    ids = sorted(read_table(root / "data/routing.parquet")["sample_id"])[:3]
    keyed = index.id_digests(ids)
    doomed = history_module.doomed_objects(index, remembered, keyed, set(), set())
    assert doomed and doomed == history_module.doomed_objects(index, full, keyed, set(), set())
    assert not doomed & index.gone, "what a forget purged is not doomed again"

    read: list[str] = []
    real = history_module._git_stages
    monkeypatch.setattr(history_module, "_git_stages", lambda at, blobs: read.extend(blobs) or real(at, blobs))
    before = sorted(set(lock_outputs(root).values()))
    planned = plan_purge(root, ids, before)
    assert read == []
    memo = index.folder / history_module.MEMO_FILE
    data = json.loads(memo.read_bytes())
    memo.write_text(json.dumps({**data, "documents": [*data["documents"], "0" * 40]}))
    assert plan_purge(root, ids, before) == planned
    assert len(read) == len(history_module._git_blobs(root)) > 0, "a rewritten history is read whole"
    for damaged in (b'{"version": 1, "documents": 3}', b'{"version": 1}', b"[]", b"{torn"):
        memo.write_bytes(damaged)
        read.clear()
        assert plan_purge(root, ids, before) == planned
        assert len(read) == len(history_module._git_blobs(root)), f"{damaged!r} is not trusted"
    memo.unlink()
    assert plan_purge(root, ids, before) == planned


def test_a_crafted_listing_or_planted_link_deletes_nothing_outside_the_store(tmp_path: Path) -> None:
    root, outside = tmp_path / "project", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "cache", "dir", "--local", "../cache")  # as typed: relative to the working directory
    cache = dvc_cache(root)
    assert cache == (tmp_path / "cache").resolve()
    victim = outside / "victim.txt"
    victim.write_text("not DVC's")
    kept = b"an object of the store"
    kept_md5 = hashlib.md5(kept).hexdigest()
    object_path(cache, kept_md5).parent.mkdir(parents=True)
    object_path(cache, kept_md5).write_bytes(kept)
    listing = json.dumps([{"md5": "../../../../outside/victim.txt", "relpath": "a"},
                          {"md5": str(victim), "relpath": "b"},
                          {"md5": kept_md5, "relpath": "../../escape"},
                          {"md5": kept_md5, "relpath": "/absolute"}]).encode()
    listing_md5 = hashlib.md5(listing).hexdigest() + ".dir"
    object_path(cache, listing_md5).parent.mkdir(parents=True, exist_ok=True)
    object_path(cache, listing_md5).write_bytes(listing)
    planted = "ee" + "f" * 30  # the object folder ee/ is a link out of the store
    (outside / planted[2:]).write_text("outside the store")
    (cache / "files" / "md5" / "ee").symlink_to(outside)

    plan = plan_purge(root, set(), [listing_md5, "../../outside/victim.txt", str(victim)])
    assert plan["superseded"] == [listing_md5], plan  # bad entries and digests never became objects
    result = purge_objects(root, {**plan, "history": [planted, "../../outside/victim.txt"]}, keep=set())
    assert victim.read_text() == "not DVC's" and (outside / planted[2:]).is_file()
    assert object_path(cache, kept_md5).is_file() and not object_path(cache, listing_md5).exists()
    assert result["cache"]["deleted_objects"] == 1 and result["cache"]["refused_outside_store"] == 1
    with pytest.raises(ValueError, match="not a DVC md5 digest"):
        object_path(cache, "../../outside/victim.txt")


def test_an_object_only_on_an_s3_remote_is_read_there_and_purged_by_provenance(tmp_path: Path) -> None:
    """A table a past commit's .dvc file names, present only on an S3 remote (moto server), is read there to
    learn what it holds: purged when it holds a forgotten ID; another table with the ID that no commit names
    stays, as does the first one when the ID forgotten is not in it."""
    moto_server = pytest.importorskip("moto.server", reason="needs the test extra: pip install -e '.[test]'")
    import boto3
    from conftest import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                              region_name="us-east-1")
        client.create_bucket(Bucket="shared")
        root = tmp_path / "project"
        root.mkdir()
        git(root, "init", "-q")
        dvc(root, "init", "-q")
        dvc(root, "remote", "add", "-d", "s3", "s3://shared/store")
        dvc(root, "remote", "modify", "s3", "endpointurl", endpoint)
        dvc(root, "remote", "modify", "--local", "s3", "access_key_id", "k")
        dvc(root, "remote", "modify", "--local", "s3", "secret_access_key", "s")
        digests = {}
        for name, ids in {"ours": ["x-1", "x-2"], "theirs": ["x-1", "y-1"]}.items():
            table = tmp_path / f"{name}.parquet"
            write_table(pd.DataFrame({"sample_id": ids, "label": [0, 1]}), table)
            digests[name] = hashlib.md5(table.read_bytes()).hexdigest()
            client.put_object(Bucket="shared", Key=f"store/files/md5/{digests[name][:2]}/{digests[name][2:]}",
                              Body=table.read_bytes())
        pointer = root / "ours.parquet.dvc"
        pointer.write_text(yaml.safe_dump({"outs": [{"md5": digests["ours"], "path": "ours.parquet", "hash": "md5"}]}))
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "a table, since removed")
        git(root, "rm", "-q", "ours.parquet.dvc")
        git(root, "commit", "-q", "-m", "removed")

        assert plan_purge(root, {"nobody"}, []) == {"superseded": [], "history": []}
        plan = plan_purge(root, {"x-1"}, [])
        assert plan == {"superseded": [], "history": [digests["ours"]]}
        result = purge_objects(root, plan, keep=set())
        keys = {o["Key"] for o in client.list_objects_v2(Bucket="shared").get("Contents", [])}
        assert keys == {f"store/files/md5/{digests['theirs'][:2]}/{digests['theirs'][2:]}"}
        assert result["remote:s3"]["deleted_objects"] == 1 and result["remote:s3"]["history"]["objects"] == 1
    finally:
        server.stop()


def test_the_final_scan_is_exact_and_reads_each_table_once_per_digest(tmp_path: Path) -> None:
    """The forget's "no forgotten ID in any data artifact" check finds exactly the tables holding an ID, and
    reads a table's IDs once per md5 (kept in the object memo): a later forget, in another process, reads only
    the file the first one rewrote."""
    from pipeline.data.dataset import write_table
    from pipeline.forget.flow import forgotten_ids_in
    from pipeline.purge.history import ObjectIndex
    from pipeline.tracking.lineage import file_md5

    data = tmp_path / "data"
    data.mkdir()
    for name, ids in {"a": ["s-1", "s-2"], "b": ["s-3"], "c": ["s-4", "s-5"],
                      "d": [f"d-{i}" for i in range(1000)]}.items():
        write_table(pd.DataFrame({"sample_id": ids, "label": range(len(ids))}), data / f"{name}.parquet")
    write_table(pd.DataFrame({"label": [0, 1], "samples": [5, 7]}), data / "classes.parquet")  # no sample IDs
    (data / "keys.npy").write_bytes(b"not a table")

    def digests() -> dict[str, str]:
        return {p.relative_to(tmp_path).as_posix(): file_md5(p) for p in sorted(data.iterdir())}

    index = ObjectIndex(tmp_path, None)
    assert forgotten_ids_in(tmp_path, digests(), {"s-3"}, index) == ["data/b.parquet"]
    assert forgotten_ids_in(tmp_path, digests(), {"d-500"}, index) == ["data/d.parquet"]
    assert index.tables_read == 4
    write_table(pd.DataFrame({"sample_id": ["s-6"], "label": [0]}), data / "b.parquet")  # the forget rewrote b
    index = ObjectIndex(tmp_path, None)  # the next forget's process: only the memo carries over
    assert forgotten_ids_in(tmp_path, digests(), {"s-3"}, index) == []
    assert forgotten_ids_in(tmp_path, digests(), {"s-5", "s-9"}, index) == ["data/c.parquet"]
    assert forgotten_ids_in(tmp_path, digests(), set(), index) == []
    assert index.tables_read == 1


@pytest.mark.parametrize("batch", [history_module.BATCH_IDS, 2])
def test_tables_read_together_hold_each_ids_own_keyed_digest(tmp_path: Path, batch: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables whose IDs are read in one pass (each distinct ID hashed once) keep in the memo exactly the sorted
    keyed digests of their own IDs, as computed one ID at a time from the memo's key: shared IDs, numeric IDs, an
    empty table and two paths with the same bytes included; so do tables read in several bounded passes."""
    monkeypatch.setattr(history_module, "BATCH_IDS", batch)
    from pipeline.tracking.lineage import file_md5

    tables: dict[str, list[Any]] = {"a": ["s-1", "s-2", "s-3"], "b": ["s-3", "s-2", "s-9"],
                                    "same-as-a": ["s-1", "s-2", "s-3"], "numeric": [7, 3, 11], "empty": []}
    paths = {}
    for name, ids in tables.items():
        paths[name] = tmp_path / f"{name}.parquet"
        frame = pd.DataFrame({"sample_id": pd.Series(ids, dtype=object if ids and isinstance(ids[0], str) else None),
                              "label": range(len(ids))})
        write_table(frame if ids else frame.astype({"sample_id": str}), paths[name])
    index = ObjectIndex(tmp_path, None)
    index.read_ids([(file_md5(path), path) for path in paths.values()])
    assert index.tables_read == 4, "the two identical files are one object, read once"
    key = (index.folder / "key").read_bytes()
    for name, ids in tables.items():
        expected = b"".join(sorted({hashlib.blake2b(str(i).encode(), key=key, digest_size=8).digest() for i in ids}))
        entry = json.loads((index.folder / file_md5(paths[name])).read_bytes())
        assert base64.b64decode(entry["ids"]) == expected, name
        assert index.holds(file_md5(paths[name]), index.id_digests([ids[-1]]) if ids else set()) == bool(ids)
    assert not index.holds(file_md5(paths["b"]), index.id_digests(["s-1", "3"]))
    assert index.holds(file_md5(paths["numeric"]), index.id_digests(["3"]))


def test_a_build_reads_its_tables_ids_so_the_first_forget_reads_none(built_project: Path) -> None:
    """`legonet build` ends by reading the IDs of the tables it wrote into the object memo: the forget's final scan
    on the built workspace then reads no table (the first forget after a build reads only what it rewrites), and
    still finds a table that holds an ID."""
    from pipeline.forget.flow import forgotten_ids_in
    from pipeline.purge.history import ObjectIndex
    from pipeline.runner.outputs import ID_TABLES, artifact_digests

    digests = artifact_digests(built_project, False, ID_TABLES)
    index = ObjectIndex(built_project, None)
    sample = read_table(built_project / "data/routing.parquet", ["sample_id"])["sample_id"].iloc[0]
    found = forgotten_ids_in(built_project, digests, {sample}, index)
    assert "data/routing.parquet" in found and any(p.startswith("data/shards/") for p in found), found
    assert forgotten_ids_in(built_project, digests, {"no-such-sample"}, index) == []
    assert index.tables_read == 0
    assert sum(p.endswith(".parquet") for p in digests) >= 10


def test_the_forget_checks_the_tables_under_reports_too(built_project: Path, tmp_path: Path) -> None:
    """The quality checkpoint's partials and tables and evaluate's test points hold sample IDs under reports/: the
    forget's last check reads those tables as well, so an ID a report still holds stops the forget."""
    from conftest import copy_project

    from pipeline.data.dataset import write_table
    from pipeline.errors import ExactnessError
    from pipeline.forget.flow import Plan, check_rebuild
    from pipeline.runner.outputs import artifact_digests

    root = copy_project(built_project, tmp_path / "project")
    assert sorted((root / "reports/quality/partials").glob("*.parquet")), "no partials: nothing under reports to scan"
    plan = Plan(train_ids=[], test_ids=[], unknown_ids=[], already_forgotten={}, partitions=[], adapters=[], n=1,
                blocks=1)
    before = artifact_digests(root)
    checks = check_rebuild(root, plan, before, [], {"ghost-1"}, {})
    scanned = next(c["detail"] for c in checks if c["name"].startswith("no forgotten ID"))
    partials = len(list((root / "reports").rglob("*.parquet")))
    assert scanned == f"{sum(p.endswith('.parquet') for p in before) + partials} tables scanned"
    write_table(pd.DataFrame({"sample_id": ["ghost-1"], "label": [0]}), root / "reports/quality/export.parquet")
    with pytest.raises(ExactnessError, match=r"found in \['reports/quality/export.parquet'\]"):
        check_rebuild(root, plan, before, [], {"ghost-1"}, {})
