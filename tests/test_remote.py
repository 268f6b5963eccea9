"""Remote stores, for real: S3 DVC remotes and an `mlflow server` whose artifacts live in S3 (issue 14).

The S3 endpoint is moto in server mode (a real HTTP S3 API on 127.0.0.1, no mocks of boto3 or DVC): two
endpoints on two ports sharing one set of buckets, one for the DVC remotes and one for the MLflow artifact store,
so the DVC endpoint can go down while the MLflow server keeps working. The MLflow server is a real subprocess
(SQLite backend, `--artifacts-destination s3://mlflow/artifacts`).

One project is built once with canary samples (tiny data + canaries, lineage and models through the server),
pushed to two S3 remotes: `plain` (a bucket without versioning) and `versioned` (object versioning on, with an
extra version and a delete marker on objects of the canaries, as uploads and `dvc gc -c` leave them). Then:

* (a, b) forget the canaries; every object and every object version of the three buckets is downloaded and holds
  no canary ID, pixel or embedding bytes, nor the bytes of a superseded adapter; the project equals a fresh build
  on the retained data (the session's ``built_project``); every remote holds what the new dvc.lock names and a
  fresh clone pulls; `legonet audit verify` finds a superseded object put back into a remote;
* (c) a forget while the DVC endpoint is down records its purge as pending and goes on (record, commit, no
  journal; exit 10 with one line); `legonet audit verify` names the pending purge; a second forget while it is
  still down is not blocked (both purges pending); the next forget with the endpoint back finishes both and its
  record lists them.

Runtime (2 cores): one build (~1-2 min), one forget of the canaries, three forgets of one sample.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
from conftest import free_port, init_args, legonet
from conftest import mlflow_server as start_mlflow_server
from test_forget import (
    CANARIES,
    artifacts_md5,
    audit_records,
    canary_frame,
    canary_needles,
    dvc,
    forget,
    parquet_plain,
    record,
    write_manifest,
)

from pipeline.data.dataset import read_table, write_table
from pipeline.data.salt import secret_path
from pipeline.project.layout import encoded_path, raw_path
from pipeline.tracking.lineage import file_md5

moto_server = pytest.importorskip("moto.server", reason="needs the test extra: pip install -e '.[test]'")

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "legonet-test", "AWS_SECRET_ACCESS_KEY": "legonet-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
BUCKETS = {"dvc-plain": False, "dvc-versioned": True, "mlflow": True}  # name -> object versioning on
DESTINATION = "s3://mlflow/artifacts"


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two moto S3 endpoints (DVC, MLflow) over one set of buckets, and an `mlflow server` storing into S3."""
    ports = {"dvc": free_port(), "mlflow": free_port()}
    servers = {name: moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
               for name, port in ports.items()}
    for server in servers.values():
        server.start()
    endpoints = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    client = s3_client(endpoints["dvc"])
    for bucket, versioned in BUCKETS.items():
        client.create_bucket(Bucket=bucket)
        if versioned:
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    # what the forget's purge needs for the MLflow bucket (MLflow's own convention), and the server's own
    env = {**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": endpoints["mlflow"]}
    home = tmp_path_factory.mktemp("mlflow-s3-server")
    try:
        with start_mlflow_server(home, DESTINATION, env) as mlflow:
            yield {"servers": servers, "ports": ports, "endpoints": endpoints, "client": client, "env": env,
                   "mlflow": mlflow}
    finally:
        for server in servers.values():
            server.stop()


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def bucket_blobs(client: Any) -> list[tuple[str, bytes]]:
    """(where, bytes) of every object version in every bucket (current, noncurrent), Parquet also decoded."""
    blobs = []
    for bucket in BUCKETS:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket):
            for version in page.get("Versions", []):
                where = f"s3://{bucket}/{version['Key']}?versionId={version['VersionId']}"
                data = client.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])[
                    "Body"].read()
                blobs.append((where, data))
                if data[:4] == b"PAR1":
                    blobs.append((f"{where} (decoded)", parquet_plain(data)))
    return blobs


def residue(client: Any, needles: dict[str, bytes], superseded: dict[str, str]) -> dict[str, list[str]]:
    """Where each canary needle occurs as bytes, and where each superseded file's exact content is stored."""
    found: dict[str, list[str]] = {name: [] for name in [*needles, *superseded]}
    for where, data in bucket_blobs(client):
        digest = hashlib.md5(data).hexdigest()
        for name, needle in needles.items():
            if needle in data:
                found[name].append(where)
        for name, md5 in superseded.items():
            if md5 == digest:
                found[name].append(where)
    return found


def object_key(md5: str) -> str:
    return f"store/files/md5/{md5[:2]}/{md5[2:]}"


@pytest.fixture(scope="module")
def remote_forget(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, stores: dict[str, Any],
                  built_project: Path) -> dict[str, Any]:
    """Build tiny data + canaries through the server, push to both S3 remotes, forget the canaries."""
    work = tmp_path_factory.mktemp("remote")
    root = work / "project"
    root.mkdir()
    samples = read_table(tiny_data)
    canaries = canary_frame(samples)
    write_table(pd.concat([samples, canaries], ignore_index=True), work / "d.parquet")
    mlflow, env = stores["mlflow"], stores["env"]
    legonet(*init_args(work / "d.parquet", {"mlflow.tracking_uri": mlflow["uri"],
                                             "mlflow.backend_store_uri": mlflow["backend"],
                                             "mlflow.artifacts_destination": DESTINATION}),
            "--data-secret", str(secret_path(built_project)), cwd=root, env=env)  # compared with built_project
    legonet("build", cwd=root, env=env)
    for name in ("plain", "versioned"):  # the URL in .dvc/config (git), the credentials in config.local
        dvc(root, "remote", "add", name, f"s3://dvc-{name}/store")
        dvc(root, "remote", "modify", name, "endpointurl", stores["endpoints"]["dvc"])
        dvc(root, "remote", "modify", "--local", name, "access_key_id", CREDENTIALS["AWS_ACCESS_KEY_ID"])
        dvc(root, "remote", "modify", "--local", name, "secret_access_key", CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        dvc(root, "push", "-q", "-r", name)
    git(root, "add", "-A")  # the project as a team shares it: pipeline, params, locks, remotes (not config.local)
    git(root, "commit", "-q", "-m", "the project, with its DVC remotes")
    client = stores["client"]
    # the versioned bucket as real use leaves it: a re-uploaded object (two versions), and an object deleted
    # without its version id (a delete marker over the old bytes, as `dvc gc -c` leaves it); both objects hold
    # a canary (its raw partition and that partition's encoded table)
    part = read_table(root / "data/routing.parquet").set_index("sample_id").loc[CANARIES[0], "partition"]
    reupload, marked = root / raw_path(int(part)), root / encoded_path(int(part))
    client.put_object(Bucket="dvc-versioned", Key=object_key(file_md5(reupload)), Body=reupload.read_bytes())
    client.delete_object(Bucket="dvc-versioned", Key=object_key(file_md5(marked)))

    needles = canary_needles(root, canaries)
    adapters_before = {p.relative_to(root).as_posix(): file_md5(p)
                       for p in sorted((root / "models/adapters").rglob("*.safetensors"))}
    before = residue(client, needles, adapters_before)
    request = write_manifest(work / "canaries.json", "req-canaries", CANARIES)
    summary = forget(root, request, env=env)
    superseded = {p: md5 for p, md5 in adapters_before.items() if file_md5(root / p) != md5}
    return {"root": root, "work": work, "summary": summary, "record": record(root, "req-canaries"),
            "needles": needles, "superseded": superseded, "before": before,
            "after": residue(client, needles, superseded), "oracle": artifacts_md5(built_project),
            "artifacts": artifacts_md5(root), "env": env}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def test_the_canaries_were_in_every_bucket_before(remote_forget: dict[str, Any]) -> None:
    """The scan works: each needle is found before the forget, in both DVC buckets (data) and in the MLflow
    bucket (the superseded adapters' weights inside the logged models)."""
    before = remote_forget["before"]
    for name in remote_forget["needles"]:
        assert any(w.startswith("s3://dvc-plain/") for w in before[name]), name
        assert any(w.startswith("s3://dvc-versioned/") for w in before[name]), name
    assert remote_forget["superseded"], "forgetting the canaries retrains adapters"
    for name in remote_forget["superseded"]:
        assert any(w.startswith("s3://mlflow/") for w in before[name]), name
        assert any(w.startswith("s3://dvc-versioned/") for w in before[name]), name


def test_no_byte_of_the_canaries_in_any_object_version(remote_forget: dict[str, Any]) -> None:
    """(a) the unversioned remote and (b) the versioned remote and MLflow bucket: every version downloaded."""
    leftovers = {name: places for name, places in remote_forget["after"].items() if places}
    assert not leftovers, f"residue in the buckets after the forget: {leftovers}"


def test_the_project_equals_a_fresh_build_on_the_retained_data(remote_forget: dict[str, Any]) -> None:
    forgot, scratch = remote_forget["artifacts"], remote_forget["oracle"]
    assert sorted(forgot) == sorted(scratch) and len(forgot) > 20
    assert not sorted(p for p in forgot if forgot[p] != scratch[p])


def test_the_record_says_what_was_purged_where(remote_forget: dict[str, Any]) -> None:
    purge = remote_forget["record"]["purge"]
    plain, versioned = purge["dvc"]["remote:plain"], purge["dvc"]["remote:versioned"]
    assert plain["store"] == "s3://dvc-plain/store" and not plain["versioned"]
    assert versioned["store"] == "s3://dvc-versioned/store" and versioned["versioned"]
    assert plain["deleted_objects"] > 0 and plain["bytes"] > 0
    # the re-uploaded object's two versions and the delete marker with the version under it count as versions
    assert versioned["deleted_versions"] >= plain["deleted_objects"] + 2
    assert purge["dvc"]["cache"]["deleted_objects"] > 0 and purge["dvc_pushed_to"] == ["plain", "versioned"]
    store = purge["mlflow"]["artifact_store"]
    assert store["store"] == DESTINATION and store["versioned"] and store["deleted_versions"] > 0
    assert purge["mlflow"]["deleted_model_versions"] == ["1"]


def test_every_remote_holds_the_new_state_and_a_fresh_clone_pulls(remote_forget: dict[str, Any]) -> None:
    root, work = remote_forget["root"], remote_forget["work"]
    for name in ("plain", "versioned"):
        assert json.loads(dvc(root, "status", "-c", "-r", name, "--json") or "{}") == {}, name
    clone = work / "clone"
    git(work, "clone", "-q", str(root), str(clone))
    (clone / ".dvc/config.local").write_text((root / ".dvc/config.local").read_text())
    dvc(clone, "pull", "-q", "-r", "plain")
    assert artifacts_md5(clone) == remote_forget["artifacts"]


def test_verify_finds_a_superseded_object_put_back_into_a_remote(remote_forget: dict[str, Any],
                                                                  stores: dict[str, Any]) -> None:
    root, client = remote_forget["root"], stores["client"]
    assert legonet("audit", "verify", cwd=root, env=remote_forget["env"]).returncode == 0
    md5 = next(iter(remote_forget["superseded"].values()))
    put = client.put_object(Bucket="dvc-versioned", Key=object_key(md5), Body=b"stale copy")
    try:
        result = legonet("audit", "verify", cwd=root, env=remote_forget["env"], check=False)
    finally:
        client.delete_object(Bucket="dvc-versioned", Key=object_key(md5), VersionId=put["VersionId"])
    assert result.returncode == 9, result.stdout + result.stderr
    assert "DVC remote 'versioned' (s3://dvc-versioned/store)" in result.stderr, result.stderr
    assert legonet("audit", "verify", cwd=root, env=remote_forget["env"]).returncode == 0


@pytest.fixture(scope="module")
def while_down(remote_forget: dict[str, Any], stores: dict[str, Any],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """(c) forgets one sample, then another, while the DVC endpoint is down (`audit verify` in between), and
    brings the endpoint back. Used by the last tests of the module: it changes the project."""
    root, env = remote_forget["root"], remote_forget["env"]
    work = tmp_path_factory.mktemp("down")
    samples = sorted(set(read_table(root / "data/routing.parquet")["sample_id"]))[:3]
    manifests = {r: write_manifest(work / f"{r}.json", r, [s])
                 for r, s in zip(("req-down-1", "req-down-2", "req-back"), samples, strict=True)}
    records = audit_records(root)
    stores["servers"]["dvc"].stop()
    try:
        first = legonet("forget", str(manifests["req-down-1"]), cwd=root, env=env, check=False)
        verify = legonet("audit", "verify", cwd=root, env=env, check=False)
        second = legonet("forget", str(manifests["req-down-2"]), cwd=root, env=env, check=False)
    finally:
        stores["servers"]["dvc"] = moto_server.ThreadedMotoServer(ip_address="127.0.0.1",
                                                                  port=stores["ports"]["dvc"], verbose=False)
        stores["servers"]["dvc"].start()
    return {"root": root, "env": env, "samples": samples, "manifests": manifests, "records": records,
            "first": first, "verify": verify, "second": second,
            "pending": (root / ".legonet/pending-purges.json").read_text()}


def superseded_on_remotes(client: Any, root: Path, request_ids: list[str]) -> list[str]:
    """The keys in the DVC buckets (any version) of a file the forgets of ``request_ids`` superseded."""
    superseded = {change["before"] for r in request_ids for change in record(root, r)["artifacts"].values()
                  if change["before"] and change["before"] != change["after"]}
    assert superseded, "each forget supersedes files"
    return [f"{bucket}/{v['Key']}" for bucket in ("dvc-plain", "dvc-versioned")
            for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket)
            for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
            if v["Key"].removeprefix("store/files/md5/").replace("/", "") in superseded]


def test_a_refused_purge_is_recorded_as_pending_and_the_forget_goes_on(while_down: dict[str, Any]) -> None:
    """(c) with the DVC endpoint down the forget rebuilds, writes its record (purge pending, with the reason),
    commits and deletes its journal (raw IDs), then exits 10 with one line; `audit verify` names the pending
    purge; the pending file holds no raw ID."""
    root, first = while_down["root"], while_down["first"]
    assert first.returncode == 10, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    assert "req-down-1 is done and recorded, but its purge is recorded as pending" in first.stderr, first.stderr
    assert "the next `legonet forget` retries it" in first.stderr
    purge = record(root, "req-down-1")["purge"]
    assert purge["status"] == "pending" and "DVC remote 'plain' (s3://dvc-plain/store) unreachable" in purge["reason"]
    assert set(purge) == {"status", "reason", "pending_since"}, "no record may claim a purge that did not happen"
    assert not (root / ".legonet/journal.json").exists()
    assert not git(root, "status", "--porcelain"), "the forget commits its changes"
    verify = while_down["verify"]
    assert verify.returncode == 9, verify.stdout + verify.stderr
    assert f"purge of request req-down-1 pending since {purge['pending_since']}: DVC remote" in verify.stderr
    assert not any(s in while_down["pending"] for s in while_down["samples"]), "the pending file holds raw IDs"


def test_a_pending_purge_does_not_block_the_next_forget(while_down: dict[str, Any]) -> None:
    """With the endpoint still down, the next forget retries the pending purge (refused again, said in one line)
    and completes its own rebuild and record: both purges are pending."""
    root, second = while_down["root"], while_down["second"]
    assert second.returncode == 10, second.stdout + second.stderr
    assert "the purge of request(s) req-down-1" in second.stderr and "is still refused" in second.stderr
    assert "req-down-2 is done and recorded, but its purge is recorded as pending" in second.stderr
    assert len(audit_records(root)) == len(while_down["records"]) + 2
    assert record(root, "req-down-2")["purge"]["status"] == "pending"
    assert record(root, "req-down-2")["status"] == "forgotten"
    assert [e["request_ids"] for e in json.loads(while_down["pending"])["pending"]] == [["req-down-1"],
                                                                                       ["req-down-2"]]


def test_the_next_forget_with_the_store_back_finishes_every_pending_purge(while_down: dict[str, Any],
                                                                          stores: dict[str, Any]) -> None:
    """Runs last. With the endpoint back, the next forget finishes both pending purges first and its record lists
    them; no object either forget superseded is left in any version of the DVC buckets; `audit verify` passes."""
    root, env = while_down["root"], while_down["env"]
    summary = forget(root, while_down["manifests"]["req-back"], env=env)
    assert summary["status"] == "forgotten" and "purge_pending" not in summary
    completed = record(root, "req-back")["completed_purges"]
    assert [c["request_ids"] for c in completed] == [["req-down-1"], ["req-down-2"]]
    assert completed[0]["purge"]["dvc"]["remote:plain"]["deleted_objects"] > 0
    assert all(c["purge"]["dvc"]["cache"]["deleted_objects"] > 0 for c in completed)
    assert json.loads((root / ".legonet/pending-purges.json").read_text()) == {"pending": [], "completed": []}
    assert not superseded_on_remotes(stores["client"], root, ["req-down-1", "req-down-2", "req-back"])
    for name in ("plain", "versioned"):
        assert json.loads(dvc(root, "status", "-c", "-r", name, "--json") or "{}") == {}, name
    verify = legonet("audit", "verify", cwd=root, env=env, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
