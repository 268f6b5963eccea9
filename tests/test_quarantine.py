"""Quarantine and deferred requests (issue 23): the registry's quarantine switches the affected adapters off before
any retraining, deferred requests wait for one batch within their deadline (a fake clock, never wall time), and
the batch leaves the project bit-identical to a fresh build on the retained data."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import copy_project, init_args, legonet
from test_forget import artifacts_md5, lock_without_package_listing

from pipeline.audit.envelope import key_id
from pipeline.audit.secrets import load_or_create_signing_key
from pipeline.data.dataset import read_table, write_table
from pipeline.data.salt import secret_path
from pipeline.errors import ParamsError
from pipeline.forget import requests
from pipeline.model.ensemble import Ensemble
from pipeline.model.keys import squared_distances
from pipeline.model.package import quarantine_param
from pipeline.tracking.quarantine import TAG, adapters_of, parse

RECEIVED = "2026-01-01T00:00:00+00:00"  # sla_days 30: due 2026-01-31
DEFERRED_AT = "2026-01-02T00:00:00+00:00"
BATCH_AT = "2026-01-30T00:00:00+00:00"


def clock(at: str) -> dict[str, str]:
    return {requests.CLOCK_ENV: at}


def manifest(path: Path, request_id: str, sample_ids: list[str], received_at: str = RECEIVED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"request_id": request_id, "sample_ids": sample_ids, "reason": "GDPR Art. 17",
                                "received_at": received_at}))
    return path


def summary(result: Any) -> dict[str, Any]:
    return json.loads(result.stdout.strip().splitlines()[-1])


def versions(root: Path) -> dict[str, dict[str, Any]]:
    """Every registered version of the project's model: its aliases and its quarantine tag's content."""
    import mlflow  # lazy: MLflow only for the tests that read the registry

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.search_model_versions("name='legonet'")
    aliases = client.get_registered_model("legonet").aliases
    return {str(v.version): {"aliases": sorted(a for a, n in aliases.items() if str(n) == str(v.version)),
                             "quarantine": parse(client.get_model_version("legonet", v.version).tags.get(TAG))}
            for v in found}


def predicted(root: Path, file: Path, env: dict[str, str]) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(legonet("predict", str(file), cwd=root, env=env).stdout))


def consulted(frame: pd.DataFrame) -> set[int]:
    return {int(a) for row in frame["adapters"] for a in str(row).split()}


# --- the model: a quarantined adapter is never consulted ---


def synthetic(n: int = 8, k: int = 3, empty: tuple[int, ...] = (5,)) -> Ensemble:
    rng = np.random.default_rng(3)
    weights = {j: ({} if j in empty else {"0.weight": rng.normal(size=(4, 6)).astype(np.float32),
                                         "0.bias": rng.normal(size=4).astype(np.float32)}) for j in range(n)}
    identity = np.vstack([np.zeros((1, 6)), np.eye(6)]).astype(np.float32)  # mean 0, then the axes
    return Ensemble(identity, rng.normal(size=(n, 6)).astype(np.float32), weights, k, [0, 1, 2, 3])


def test_a_quarantined_predict_consults_the_next_nearest_unquarantined_adapters_deterministically() -> None:
    ensemble = synthetic()
    embeddings = np.random.default_rng(4).normal(size=(200, 6)).astype(np.float32)
    full, routed = ensemble.predict_proba(embeddings)
    quarantine = sorted({int(routed[0, 0]), int(routed[1, 0]), 2})
    proba, activated = ensemble.predict_proba(embeddings, quarantine)
    assert not set(activated.ravel().tolist()) & set(quarantine)
    assert set(routed.ravel().tolist()) & set(quarantine)  # the quarantine changed what some samples consult
    allowed = [j for j in range(8) if j not in quarantine and j != 5]  # 5 has no training samples
    distances = squared_distances(embeddings, ensemble.keys)[:, allowed]
    nearest = np.asarray(allowed)[np.argsort(distances, axis=1, kind="stable")[:, :3]]
    assert np.array_equal(activated, nearest)
    again, same = ensemble.predict_proba(embeddings, list(reversed(quarantine)))
    assert again.tobytes() == proba.tobytes() and np.array_equal(same, activated)
    untouched = ~np.isin(routed, quarantine).any(axis=1)  # samples that consulted none: bit for bit as before
    assert untouched.any() and proba[untouched].tobytes() == full[untouched].tobytes()


def test_a_quarantine_that_is_malformed_or_leaves_nothing_is_a_clear_error() -> None:
    ensemble = synthetic(n=4, k=2, empty=(3,))
    points = np.zeros((2, 6), dtype=np.float32)
    with pytest.raises(ValueError, match=r"adapter\(s\) \[9\].*0\.\.3"):
        ensemble.predict_proba(points, [9])
    with pytest.raises(ValueError, match="leaves no trained adapter"):
        ensemble.predict_proba(points, [0, 1, 2])
    assert quarantine_param({"quarantine": np.array([3, 1, 1])}) == [1, 3] and quarantine_param(None) == []
    for bad in ("1,2", [1.5], [True]):
        with pytest.raises(ValueError, match="list of adapter numbers"):
            quarantine_param({"quarantine": bad})
    assert adapters_of({}) == [] and adapters_of({TAG: '{"adapters": [4, 2], "requests": ["r"]}'}) == [2, 4]
    with pytest.raises(ValueError, match="not a quarantine"):
        adapters_of({TAG: '{"adapters": "all"}'})


# --- deadlines, on a fake clock ---


def test_deadlines_follow_the_fake_clock_and_the_sla(monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"requests": {"sla_days": 30}}
    assert requests.deadline("2026-01-01", params) == datetime(2026, 1, 31, tzinfo=UTC)
    assert requests.deadline("2026-01-01T10:00:00+02:00", params) == datetime(2026, 1, 31, 8, tzinfo=UTC)
    assert requests.deadline("2026-01-01T10:00:00", {}) == datetime(2026, 1, 31, 10, tzinfo=UTC)  # default 30
    monkeypatch.setenv(requests.CLOCK_ENV, "2026-01-29T12:00:00+00:00")
    at = requests.now()
    assert at == datetime(2026, 1, 29, 12, tzinfo=UTC)
    item = requests.Deferred("r", "m.json", "d", RECEIVED, requests.stamp(requests.deadline(RECEIVED, params)),
                             DEFERRED_AT, [1])
    assert not item.due(at) and item.due(at, timedelta(days=2)) and not item.due(at, timedelta(days=1))
    monkeypatch.setenv(requests.CLOCK_ENV, "2026-01-31T00:00:00+00:00")
    assert item.due(requests.now())  # the deadline itself is too late
    for bad in (0, -3, "30", True):
        with pytest.raises(ParamsError, match=r"requests\.sla_days"):
            requests.sla_days({"requests": {"sla_days": bad}})
    monkeypatch.setenv(requests.CLOCK_ENV, "2026-01-31T00:00:00")
    with pytest.raises(ParamsError, match="no UTC offset"):
        requests.now()


# --- the whole flow on a real project ---


@pytest.fixture(scope="module")
def deferred_run(tmp_path_factory: pytest.TempPathFactory, built_project: Path, tiny_data: Path) -> dict[str, Any]:
    """Defer two requests (the first crashes between being kept and being quarantined, then is re-run at the same
    time as the second is deferred), forget a third at once, then run the batch before the deadline; meanwhile
    build the oracle: a fresh project on the retained data."""
    work = tmp_path_factory.mktemp("quarantine")
    root = copy_project(built_project, work / "project")
    routing = read_table(root / "data/routing.parquet")
    sets = routing["adapters"].map(lambda a: tuple(sorted(int(j) for j in a)))
    pair = sets.value_counts().index[0]  # the most common pair: r1 and r2 both activate it
    members = sorted(routing["sample_id"][sets == pair])
    third = sorted(routing["sample_id"][sets.map(lambda s: len(set(s) & set(pair)) == 1)])[0]
    test_ids = sorted(read_table(root / "data/test/test.parquet")["sample_id"])
    r1 = manifest(work / "m/r1.json", "req-defer-1", members[:2])
    r2 = manifest(work / "m/r2.json", "req-defer-2", [members[2], test_ids[0]])
    r3 = manifest(work / "m/r3.json", "req-now-3", [third])
    late = manifest(work / "m/late.json", "req-late", [members[3]], received_at="2025-11-01")
    removed = {*members[:3], test_ids[0], third}
    samples = read_table(tiny_data)
    write_table(samples[~samples["sample_id"].isin(removed)].reset_index(drop=True), work / "retained.parquet")
    oracle = work / "oracle"
    oracle.mkdir()
    failures: list[BaseException] = []

    def build_oracle() -> None:
        try:
            # the data secret of built_project (which the project was copied from): compared byte for byte
            legonet(*init_args(work / "retained.parquet"), "--data-secret", str(secret_path(built_project)), cwd=oracle)
            legonet("build", cwd=oracle)
        except BaseException as exc:  # re-raised in the main thread
            failures.append(exc)

    builder = threading.Thread(target=build_oracle)
    builder.start()
    probe = work / "probe.parquet"  # test samples as a user's file, to score with `legonet predict`
    write_table(read_table(root / "data/test/test.parquet").drop(columns=["label"], errors="ignore"), probe)
    out: dict[str, Any] = {"root": root, "oracle": oracle, "pair": pair, "third": sets[routing["sample_id"] ==
                           third].iloc[0], "before": versions(root)}
    out["full"] = predicted(root, probe, clock(DEFERRED_AT))
    out["late"] = legonet("forget", "--defer", str(late), cwd=root, env=clock(DEFERRED_AT), check=False)
    out["crashed"] = legonet("forget", "--defer", str(r1), cwd=root, check=False,
                             env={**clock(DEFERRED_AT), "LEGONET_CRASH_AFTER": "defer-stored"})
    out["after_crash"] = json.loads(legonet("requests", "--json", cwd=root, env=clock(DEFERRED_AT)).stdout)
    results: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda n=n, m=m: results.__setitem__(n, legonet(
        "forget", "--defer", str(m), cwd=root, env=clock(DEFERRED_AT)))) for n, m in (("r1", r1), ("r2", r2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out["deferred"] = {n: summary(r) for n, r in results.items()}
    out["listed"] = json.loads(legonet("requests", "--json", cwd=root, env=clock(DEFERRED_AT)).stdout)
    out["held"] = versions(root)
    out["quarantined"] = [predicted(root, probe, clock(DEFERRED_AT)) for _ in range(2)]
    out["now"] = summary(legonet("forget", str(r3), cwd=root, env=clock("2026-01-03T00:00:00+00:00")))
    out["after_now"] = versions(root)
    out["not_due"] = summary(legonet("requests", "run", "--due-within", "2", cwd=root,
                                     env=clock("2026-01-10T00:00:00+00:00")))
    out["overdue"] = legonet("requests", cwd=root, env=clock("2026-02-01T00:00:00+00:00"))
    out["batch"] = summary(legonet("requests", "run", "--due-within", "2", cwd=root, env=clock(BATCH_AT)))
    out["after_batch"] = versions(root)
    out["left"] = json.loads(legonet("requests", "--json", cwd=root, env=clock(BATCH_AT)).stdout)
    legonet("audit", "receipt", "req-defer-1", "--output", str(work / "receipt.json"), cwd=root)
    out["receipt"] = work / "receipt.json"
    out["fingerprint"] = key_id(load_or_create_signing_key(root / ".legonet/keys/signing.key",
                                                           create=False).public_key())
    builder.join()
    if failures:
        raise failures[0]
    return out


def test_a_request_past_its_deadline_cannot_be_deferred(deferred_run: dict[str, Any]) -> None:
    late = deferred_run["late"]
    assert late.returncode == 3 and "req-late" in late.stderr and "without --defer" in late.stderr
    assert "req-late" not in {d["request_id"] for d in deferred_run["listed"]}


def test_a_crash_mid_defer_is_finished_by_rerunning_beside_another_defer(deferred_run: dict[str, Any]) -> None:
    assert deferred_run["crashed"].returncode == -signal.SIGKILL
    assert [(d["request_id"], d["state"]) for d in deferred_run["after_crash"]] == [("req-defer-1", "received")]
    listed = {d["request_id"]: d for d in deferred_run["listed"]}
    assert sorted(listed) == ["req-defer-1", "req-defer-2"]
    assert {d["state"] for d in listed.values()} == {"quarantined"}
    assert {d["quarantined_at"] for d in listed.values()} == {DEFERRED_AT}
    assert {d["deadline"] for d in listed.values()} == {"2026-01-31T00:00:00+00:00"}
    assert all(d["status"] == "deferred" for d in deferred_run["deferred"].values())


def test_the_quarantine_is_published_on_the_served_versions_and_accumulates(deferred_run: dict[str, Any]) -> None:
    pair = set(deferred_run["pair"])
    assert all(not v["quarantine"]["adapters"] for v in deferred_run["before"].values())
    held = champion_of(deferred_run["held"])
    assert set(held["quarantine"]["adapters"]) == pair  # r2's test sample adds no adapter
    assert held["quarantine"]["requests"] == ["req-defer-1", "req-defer-2"]
    # a plain forget of a third request: quarantined with the deferred ones, then its rebuild's version lifts
    # only its own adapters, the deferred requests' stay
    assert deferred_run["now"]["status"] == "forgotten"
    new = champion_of(deferred_run["after_now"])
    assert set(new["quarantine"]["adapters"]) == pair and new["quarantine"]["requests"] == ["req-defer-1",
                                                                                             "req-defer-2"]


def champion_of(found: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return next(v for v in found.values() if "champion" in v["aliases"])


def test_a_quarantined_predict_never_names_a_quarantined_adapter(deferred_run: dict[str, Any]) -> None:
    full, (first, second) = deferred_run["full"], deferred_run["quarantined"]
    pair = set(deferred_run["pair"])
    assert pair <= consulted(full)
    assert not consulted(first) & pair and consulted(first)
    pd.testing.assert_frame_equal(first, second)  # deterministic
    kept = ~full["adapters"].map(lambda a: bool({int(j) for j in str(a).split()} & pair))
    assert kept.any()  # a sample that consulted no quarantined adapter gets the same answer
    pd.testing.assert_frame_equal(first[kept], full[kept])


def test_the_batch_runs_before_the_deadline_and_only_its_version_lifts_the_quarantine(
        deferred_run: dict[str, Any]) -> None:
    assert deferred_run["not_due"]["status"] == "nothing-due"
    assert "PAST their deadline" in deferred_run["overdue"].stderr and "req-defer-1" in deferred_run["overdue"].stderr
    batch = deferred_run["batch"]
    assert batch["status"] == "forgotten" and batch["request_ids"] == ["req-defer-1", "req-defer-2"]
    lifted = champion_of(deferred_run["after_batch"])
    assert lifted["quarantine"] == {"adapters": [], "requests": []}  # no tag: the version that retrained them
    assert deferred_run["left"] == []
    assert not (deferred_run["root"] / requests.REQUESTS / "req-defer-1").exists()  # raw IDs gone


def test_the_receipt_carries_the_times_and_verifies_offline(deferred_run: dict[str, Any], tmp_path: Path) -> None:
    receipt = json.loads(deferred_run["receipt"].read_text())
    record = json.loads(receipt["record"])
    times = json.loads(base64.b64decode(record["payload"]))["predicate"]["times"]
    assert times == {"received": RECEIVED, "deadline": "2026-01-31T00:00:00+00:00", "quarantined": DEFERRED_AT,
                     "retrained": BATCH_AT, "purged": BATCH_AT}
    ok = legonet("audit", "verify-receipt", str(deferred_run["receipt"]), "--trusted-key",
                 deferred_run["fingerprint"], cwd=tmp_path)
    assert "receipt of request req-defer-1" in ok.stdout and f"quarantined {DEFERRED_AT}" in ok.stdout


def test_after_the_batch_the_project_is_bit_identical_to_a_fresh_build(deferred_run: dict[str, Any]) -> None:
    forgot, scratch = artifacts_md5(deferred_run["root"]), artifacts_md5(deferred_run["oracle"])
    assert sorted(forgot) == sorted(scratch) and len(forgot) > 20
    assert not sorted(p for p in forgot if forgot[p] != scratch[p])
    assert lock_without_package_listing(deferred_run["root"]) == lock_without_package_listing(deferred_run["oracle"])
