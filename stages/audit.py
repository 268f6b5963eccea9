"""`legonet audit verify|show|report|check-id`: what an auditor or a data subject runs against the audit log."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from pipeline import forget as flow
from pipeline.audit import id_digest
from pipeline.layout import ENCODED_TRAIN, KEYS, PROJECTION, adapter_name, adapter_path, shard_path
from pipeline.lineage import file_md5
from pipeline.purge import local_remotes, object_path, remote_residue
from stages.build import dvc_lock_digest
from stages.forget import audit_key, audit_log


class AuditFailed(RuntimeError):
    """`legonet audit verify` found problems; the message lists each one."""


def verify(root: Path, params: dict[str, Any], rebuild: bool = False) -> list[str]:
    """Every check an auditor needs, as a list of passed-check lines; raises AuditFailed listing the problems."""
    log = audit_log(root)
    problems = log.verify()
    records = log.records()
    passed = [f"{len(records)} record(s): signatures and hash chain intact"] if not problems else []
    if records:
        last = records[-1]
        problems += _subject_problems(root, last)
        if last["predicate"]["dvc_lock"]["after"] != dvc_lock_digest(root):
            problems.append(f"dvc.lock changed since the last audited request {last['predicate']['request_id']}")
    problems += _workspace_problems(root)
    found = _forgotten_present(root, records, audit_key(root, params))
    problems += [f"forgotten sample of request(s) {', '.join(r)} is present in {p}" for p, r in found]
    problems += remote_residue(root, records)  # superseded objects in any configured DVC remote (S3 included)
    if rebuild and records:
        problems += rebuild_adapters(root, params, records[-1]["predicate"]["affected"]["adapters"])
        passed.append("affected adapters re-derived from scratch: bit-identical")
    if problems:
        raise AuditFailed("audit verification failed:\n" + "\n".join(f"  - {p}" for p in problems))
    return [*passed, "current model and adapters match the last record", "workspace matches dvc.lock",
            "no forgotten ID in data, DVC cache or remote tables"]


def _subject_problems(root: Path, record: dict[str, Any]) -> list[str]:
    expected = {s["name"]: s["digest"]["sha256"] for s in record["subject"]}
    current = flow.subjects(root)
    problems = [f"{name}: changed since the last record" for name in sorted(expected)
                if name in current and current[name] != expected[name]]
    problems += [f"{name}: missing (recorded in the last audit record)"
                 for name in sorted(set(expected) - set(current))]
    problems += [f"{name}: not in the last audit record" for name in sorted(set(current) - set(expected))]
    return problems


def _workspace_problems(root: Path) -> list[str]:
    """Each DVC-tracked file in the workspace must have the digest dvc.lock / its .dvc file records."""
    cache = root / ".dvc" / "cache"
    problems = []
    for path, md5 in flow.lock_outputs(root).items():
        target = root / path
        if md5.endswith(".dir"):
            listing = object_path(cache, md5)
            if not listing.is_file():
                problems.append(f"{path}: directory listing {md5} missing from the DVC cache")
                continue
            for item in json.loads(listing.read_text()):
                file = target / item["relpath"]
                if not file.is_file() or file_md5(file) != item["md5"]:
                    problems.append(f"{path}/{item['relpath']}: differs from dvc.lock")
        elif not target.is_file() or file_md5(target) != md5:
            problems.append(f"{path}: differs from dvc.lock")
    return problems


def _forgotten_present(root: Path, records: list[dict[str, Any]], key: bytes) -> list[tuple[str, list[str]]]:
    import pyarrow.parquet as pq

    owners: dict[str, list[str]] = {}
    for record in records:
        for digest in record["predicate"].get("forgotten_ids", []):
            owners.setdefault(digest, []).append(record["predicate"]["request_id"])
    if not owners:
        return []
    tables = [p for p in (root / "data").rglob("*.parquet")]
    stores = [root / ".dvc" / "cache", *local_remotes(root).values()]  # the remotes too, as verify promises
    tables += [p for store in stores for p in (store / "files").rglob("*") if p.is_file() and _is_parquet(p)]
    found = []
    for table in tables:
        try:
            ids = pq.read_table(table, columns=["sample_id"]).column(0).to_pylist()
        except (OSError, KeyError, ValueError):
            continue
        hits = sorted({r for i in ids for r in owners.get(id_digest(key, i), [])})
        if hits:
            found.append((table.relative_to(root).as_posix() if table.is_relative_to(root) else str(table), hits))
    return found


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PAR1"


def rebuild_adapters(root: Path, params: dict[str, Any], adapters: list[int]) -> list[str]:
    """Re-derive the given adapters from the encoded data in a temporary directory and compare bits.

    Shards are recomputed from the encoded train partitions, projection and keys (not read from data/shards),
    then each adapter is retrained with its seed; both must equal the files the project holds.
    """
    import tempfile

    import numpy as np
    from safetensors.numpy import save

    from pipeline.adapters import TrainParams, adapter_seed, train_adapter
    from pipeline.dataset import read_embeddings, write_embeddings
    from pipeline.keys import project
    from pipeline.routing import route, shard

    projection, keys = np.load(root / PROJECTION), np.load(root / KEYS)
    n, blocks = int(params["adapters"]["n"]), int(params["adapters"]["blocks"])
    frames, points = [], []
    for part in sorted((root / ENCODED_TRAIN).glob("part-*.parquet")):
        frame, embeddings = read_embeddings(part)
        frames.append(frame)
        points.append(project(embeddings, projection))
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True)
    features = np.concatenate(points)
    shards = shard(frame.assign(row=np.arange(len(frame))), route(features, keys, int(params["adapters"]["k"])),
                   keys.shape[0])
    classes = list(params["data"]["classes"])
    index = {c: i for i, c in enumerate(classes)}
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for j in adapters:
            rows = shards[j]
            shard_file, stored_shard = Path(tmp) / f"{adapter_name(j)}.parquet", shard_path(j, n, blocks)
            write_embeddings(shard_file, rows[["sample_id", "label"]], features[rows["row"].to_numpy()])
            if shard_file.read_bytes() != (root / stored_shard).read_bytes():
                problems.append(f"{stored_shard}: differs from a from-scratch re-derivation")
            _, shard_features = read_embeddings(shard_file)
            labels = np.array([index[c] for c in rows["label"]], dtype=np.int64)
            weights = train_adapter(shard_features, labels, len(classes),
                                    adapter_seed(int(params["adapters"]["seed"]), j),
                                    TrainParams(**params["adapters"]["train"]))
            stored = adapter_path(j, n, blocks)
            if save(weights) != (root / stored).read_bytes():
                problems.append(f"{stored}: retraining from scratch gives different bits")
    return problems


def show(root: Path, request_id: str) -> dict[str, Any]:
    record = audit_log(root).find(request_id)
    if record is None:
        raise AuditFailed(f"no audit record for request {request_id!r}; `legonet audit report` lists them")
    return record


def check_id(root: Path, params: dict[str, Any], sample_id: str) -> list[dict[str, Any]]:
    """The records that forgot this ID (matched by HMAC; the log never stores the ID itself)."""
    log = audit_log(root)
    found = log.find_id(audit_key(root, params), sample_id)
    return [{"request_id": r, "recorded_at": log.find(r)["predicate"]["recorded_at"]} for r in found]


def report(root: Path, out: Path) -> Path:
    """A self-contained HTML page for a compliance officer: one section per request."""
    records = audit_log(root).records()
    problems = audit_log(root).verify()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>legonet audit report</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}.ok{color:#060}.bad{color:#a00}"
             "</style></head><body><h1>legonet audit report</h1>",
             f"<p>Project: {html.escape(str(root.resolve()))}. Records: {len(records)}. Log integrity: "
             + ("<span class='ok'>signatures and chain verified</span>" if not problems else
                "<span class='bad'>" + html.escape("; ".join(problems)) + "</span>") + "</p>"]
    for record in records:
        p = record["predicate"]
        rows = [("request", p["request_id"]), ("reason", p.get("reason", "")),
                ("received", p.get("received_at", "")), ("recorded", p["recorded_at"]), ("status", p["status"]),
                ("samples removed", str(len(p["forgotten_ids"]))),
                ("not present / already forgotten", f"{len(p['not_present_ids'])} / {len(p['already_forgotten_ids'])}"),
                ("partitions rewritten", str(p["affected"]["partitions"])),
                ("adapters retrained", str(p["affected"]["adapters"])),
                ("adapters untouched", str(len(p["untouched_adapters"]))),
                ("model version", f"{p['registry'].get('model_version', '-')} "
                                  f"{p['registry'].get('aliases', '')} {p['registry'].get('gate_reason', '')}"),
                ("purge", json.dumps(p["purge"], sort_keys=True)),
                ("timings (s)", json.dumps(p["timings_seconds"], sort_keys=True)),
                ("code revision", p["code_revision"]), ("platform", json.dumps(p["platform"], sort_keys=True))]
        checks = "".join(f"<li class='{'ok' if c['passed'] else 'bad'}'>{html.escape(c['name'])}: "
                         f"{html.escape(c['detail'])}</li>" for c in p["checks"])
        parts.append(f"<h2>Request {html.escape(p['request_id'])} (record {p['sequence']})</h2><table>"
                     + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
                     + f"</table><h3>Checks</h3><ul>{checks or '<li>no rebuild needed</li>'}</ul>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out
