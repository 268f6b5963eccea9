"""What an auditor, a compliance officer or a data subject runs against the audit log (`legonet audit ...`).

Every action that reads records verifies the whole log first (``AuditLog.records``) against the signing keys
trusted from outside the repository (``pipeline.audit.keyring``), and refuses a log that does not verify.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.audit.checks import artifact_chain_problems
from pipeline.audit.disclosure import adapter_root, names_adapter, opened, root_problems
from pipeline.audit.keyring import AUDIT_KEY, audit_key, audit_keys, audit_log, key_dir, origin, signing_key
from pipeline.audit.log import AuditLog
from pipeline.audit.receipt import make_receipt, verify_receipt
from pipeline.audit.record import subjects
from pipeline.audit.secrets import audit_key_id, forgotten_by, read_public_keys, unseal
from pipeline.data.dataset import read_embeddings, write_embeddings
from pipeline.data.salt import salt_of
from pipeline.errors import AuditError, AuditFailed, IdentityError
from pipeline.model.adapters import TrainParams, adapter_bytes, adapter_seed, train_adapter
from pipeline.model.keys import project
from pipeline.model.routing import route, shard
from pipeline.project.layout import ENCODED_TRAIN, KEYS, PROJECTION, adapter_name, adapter_path, shard_path
from pipeline.project.scratch import scratch_dir
from pipeline.purge import pending
from pipeline.purge.history import history_objects
from pipeline.purge.models import residue
from pipeline.purge.objects import DIGEST, dvc_cache, local_remotes, object_path, remote_residue
from pipeline.runner.build import dvc_lock_digest
from pipeline.runner.outputs import ID_TABLES, lock_outputs
from pipeline.tracking.identity import project_id
from pipeline.tracking.lineage import absolute_store, fresh_md5


def verify(root: Path, params: dict[str, Any], rebuild: bool = False, trusted: Sequence[str] = (),
           checkpoints: Sequence[Path] = ()) -> list[str]:
    """Every check an auditor needs, as a list of passed-check lines; raises AuditFailed listing the problems."""
    log = audit_log(root, params, trusted, checkpoints)
    problems = log.verify()  # also proves, by consistency proofs, that the log extends every kept checkpoint
    records = [] if problems else log.records()
    keys: list[bytes] | None = None
    if log.leaf_data() and not problems:
        try:
            keys = audit_keys(root, params, log)
        except AuditError as exc:
            problems.append(f"audit key: {exc}")
    problems += artifact_chain_problems([r["predicate"] for r in records])
    passed = [f"{len(records)} forget record(s): trusted signatures, hash chain and Merkle tree intact",
              "each record starts from the artifacts the one before it left (or from a build recorded between)"]
    passed += [f"the log extends {where} (consistency proof)" for where, _ in log.anchors]
    if keys is not None:  # the sealed changes, opened: each must give the adapter roots the record published
        known = {audit_key_id(k) for k in keys}
        records = [opened(r, _unsealer(_keyed(keys), r) if r["predicate"].get("audit_key_id") in known else None)
                   for r in records]
        problems += [p for r in records for p in root_problems(r)]
        passed.append("each record's sealed adapter digests give its published before and after roots: no other "
                      "adapter file changed")
    if records:
        last = records[-1]
        problems += _subject_problems(root, last) + _adapter_root_problems(root, last)
        if last["predicate"]["dvc_lock"]["after"] != dvc_lock_digest(root):
            problems.append(f"dvc.lock changed since the last audited request {last['predicate']['request_id']}")
    problems += _workspace_problems(root) + _dvc_status_problems(root)
    if keys is not None:
        found = _forgotten_present(root, log.summaries(), keys)
        problems += [f"forgotten sample of request(s) {', '.join(r)} is present in {p}" for p, r in found]
    problems += pending.outstanding(root, records)  # purges a store refused, not finished since
    problems += remote_residue(root, records)  # superseded objects in any configured DVC remote (S3 included)
    problems += _mlflow_problems(root, params, records)
    if rebuild and records and keys is None:
        problems.append("--rebuild needs the audit key: the record seals which adapters the last forget retrained")
    elif rebuild and records:
        problems += rebuild_adapters(root, params, records[-1]["predicate"]["affected"]["adapters"])
        passed.append("affected adapters re-derived from scratch in a temporary directory: bit-identical")
    if problems:
        raise AuditFailed("audit verification failed:\n" + "\n".join(f"  - {p}" for p in problems))
    return [*passed, "no purge pending", "current model and adapters match the last record (the adapter files: its "
            "Merkle root)",
            "workspace matches dvc.lock", "`dvc status`: up to date",
            "no forgotten ID in the tables under data/, models/ and reports/, the DVC cache or a local remote",
            "no MLflow model version or logged model of this project trained on forgotten data"]


def _mlflow_problems(root: Path, params: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """The project's MLflow objects a forget should have purged and that are still there (``models.residue``)."""
    from mlflow.exceptions import MlflowException  # lazy: MLflow loads only when there are records to check


    settings = params["mlflow"]
    uri = absolute_store(settings["tracking_uri"], root)
    if not records or (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()):
        return []  # nothing forgotten, or no store to hold anything (opening one would create it)
    try:
        return residue(uri, project_id(params), settings["registered_model"], records,
                       root / "mlartifacts" / "models")
    except IdentityError as exc:
        return [str(exc)]
    except MlflowException as exc:
        return [f"MLflow store {uri}: cannot check the project's models ({str(exc)[:300]})"]


def _dvc_status_problems(root: Path) -> list[str]:
    """What `dvc status` says is out of date: a data file changed with its .dvc file "fixed" shows up here."""
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True,
                            text=True)
    if result.returncode != 0:
        return [f"`dvc status` failed: {result.stderr.strip()[-300:]}"]
    changed = json.loads(result.stdout or "{}")
    return [f"`dvc status`: {stage} is not up to date ({json.dumps(detail, sort_keys=True)[:200]})"
            for stage, detail in sorted(changed.items())]


def _subject_problems(root: Path, record: dict[str, Any]) -> list[str]:
    expected = {s["name"]: s["digest"]["sha256"] for s in record["subject"]}
    current = subjects(root)
    problems = [f"{name}: changed since the last record" for name in sorted(expected)
                if name in current and current[name] != expected[name]]
    problems += [f"{name}: missing (recorded in the last audit record)"
                 for name in sorted(set(expected) - set(current))]
    problems += [f"{name}: not in the last audit record" for name in sorted(set(current) - set(expected))]
    return problems


def _adapter_root_problems(root: Path, record: dict[str, Any]) -> list[str]:
    """The last record's published after root must be the root over the project's adapter files as they are: the
    chain of roots ends in the workspace, so each adapter file's digest is stated without a record listing it."""
    published = record["predicate"].get("adapter_files")
    if not isinstance(published, dict):
        return []  # a record made before the adapter files were published as roots
    files = [f for top in ("data", "models") if (root / top).is_dir() for f in (root / top).rglob("adapter-*")
             if f.is_file() and names_adapter(f.name)]
    current = adapter_root({f.relative_to(root).as_posix(): fresh_md5(f) for f in files})
    if current == published.get("after"):
        return []
    return [f"adapter files: their Merkle root {current[:16]} is not the after root {str(published.get('after'))[:16]} "
            f"of the last audited request {record['predicate']['request_id']}"]


def _workspace_problems(root: Path) -> list[str]:
    """Each DVC-tracked file in the workspace must have the digest dvc.lock / its .dvc file records."""
    cache = dvc_cache(root)
    problems = []
    for path, md5 in lock_outputs(root).items():
        target = root / path
        if not DIGEST.fullmatch(str(md5)):
            problems.append(f"{path}: recorded md5 {str(md5)[:40]!r} is not an md5 hash")
            continue
        if md5.endswith(".dir"):
            listing = object_path(cache, md5)
            if not listing.is_file():
                problems.append(f"{path}: directory listing {md5} missing from the DVC cache")
                continue
            for item in json.loads(listing.read_text()):
                relpath = Path(str(item.get("relpath", "")))
                if relpath.is_absolute() or ".." in relpath.parts or not DIGEST.fullmatch(str(item.get("md5"))):
                    problems.append(f"{path}: directory listing {md5} holds a bad entry {str(item)[:80]}")
                    continue
                file = target / relpath
                if not file.is_file() or fresh_md5(file) != item["md5"]:
                    problems.append(f"{path}/{item['relpath']}: differs from dvc.lock")
        elif not target.is_file() or fresh_md5(target) != md5:
            problems.append(f"{path}: differs from dvc.lock")
    return problems


def _forgotten_present(root: Path, summaries: list[dict[str, Any]], keys: list[bytes]
                       ) -> list[tuple[str, list[str]]]:
    if not any(summary["forgotten_ids"] for summary in summaries):
        return []
    owners = forgotten_by(summaries, keys)
    tables = [p for top in ID_TABLES if (root / top).is_dir() for p in sorted((root / top).rglob("*.parquet"))]
    stores = [dvc_cache(root), *local_remotes(root).values()]  # the remotes too, as verify promises
    # only this project's objects: a shared cache or remote holds other projects' tables, whose forgets are theirs
    objects = sorted(d for d in history_objects(root) if not d.endswith(".dir"))
    tables += [p for store in stores for md5 in objects if (p := object_path(store, md5)).is_file() and _is_parquet(p)]
    found = []
    for table in tables:
        try:
            ids = pq.read_table(table, columns=["sample_id"]).column(0).to_pylist()
        except (OSError, KeyError, ValueError):
            continue
        hits = sorted({r for requests in owners(ids).values() for r in requests})
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
    projection, keys = np.load(root / PROJECTION), np.load(root / KEYS)
    n, blocks = int(params["adapters"]["n"]), int(params["adapters"]["blocks"])
    frames, points = [], []
    for part in sorted((root / ENCODED_TRAIN).glob("part-*.parquet")):
        frame, embeddings = read_embeddings(part)
        frames.append(frame)
        points.append(project(embeddings, projection))
    frame = pd.concat(frames, ignore_index=True)
    features = np.concatenate(points)
    shards = shard(frame.assign(row=np.arange(len(frame))), route(features, keys, int(params["adapters"]["k"])),
                   keys.shape[0])
    classes = list(params["data"]["classes"])
    index = {c: i for i, c in enumerate(classes)}
    problems = []
    with scratch_dir(root, "rebuild") as tmp:  # re-derived shards hold sample rows: never outside the project
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
            salt = salt_of(root / stored, sorted(rows["sample_id"]))
            if adapter_bytes(weights, salt) != (root / stored).read_bytes():
                problems.append(f"{stored}: retraining from scratch gives different bits")
    return problems


def show(root: Path, params: dict[str, Any], request_id: str, trusted: Sequence[str] = (),
         checkpoints: Sequence[Path] = ()) -> dict[str, Any]:
    """The verified record of one request; with the audit key at hand, its sealed fields opened."""
    log = audit_log(root, params, trusted, checkpoints)
    record = log.find(request_id)
    if record is None:
        raise AuditFailed(f"no audit record for request {request_id!r}; `legonet audit report` lists them")
    opener = _opener(root, params, log)
    sealed = record["predicate"].get("sealed")
    unseal_own = _unsealer(opener, record)
    if unseal_own is None or not isinstance(sealed, str):
        return record
    return {**opened(record, unseal_own), "opened": unseal_own(sealed)}


def _opener(root: Path, params: dict[str, Any], log: AuditLog) -> Any:
    """(audit key id, sealed) -> the opened fields, under the audit key the record names; None for a reader
    without the keys (the records stay opaque to them)."""
    if not (key_dir(root, params) / AUDIT_KEY).exists():
        return None
    return _keyed(audit_keys(root, params, log))


def _keyed(keys: Sequence[bytes]) -> Any:
    """(audit key id, sealed) -> the opened fields, for records keyed with one of ``keys``."""
    by_id = {audit_key_id(key): key for key in keys}
    return lambda named, sealed: unseal(by_id[named], sealed)


def _unsealer(opener: Any, record: dict[str, Any]) -> Any:
    """sealed -> opened, under the audit key ``record`` names; None without an opener."""
    if opener is None:
        return None
    return lambda sealed: opener(record["predicate"]["audit_key_id"], sealed)


def check_id(root: Path, params: dict[str, Any], sample_id: str, trusted: Sequence[str] = (),
             checkpoints: Sequence[Path] = ()) -> list[dict[str, Any]]:
    """The records that forgot this ID (matched by HMAC; the log never stores the ID itself)."""
    log = audit_log(root, params, trusted, checkpoints)
    records = log.records()
    if not records:  # nothing forgotten: do not create the audit key just to look
        return []
    found = set(log.find_id(audit_keys(root, params, log), sample_id))
    return [{"request_id": r["predicate"]["request_id"], "recorded_at": r["predicate"]["recorded_at"]}
            for r in records if r["predicate"]["request_id"] in found]


def checkpoint(root: Path, params: dict[str, Any], trusted: Sequence[str] = (),
               checkpoints: Sequence[Path] = ()) -> str:
    """The current signed checkpoint (tree size and root of the verified log), signed with the project's key."""
    log = audit_log(root, params, trusted, checkpoints)
    return log.checkpoint(origin(log, audit_key(root, params, log)), signing_key(root, params, log))


def receipt(root: Path, params: dict[str, Any], request_id: str, trusted: Sequence[str] = (),
            checkpoints: Sequence[Path] = ()) -> dict[str, Any]:
    """A data subject's self-contained receipt for one request (see pipeline.audit.receipt)."""
    return make_receipt(audit_log(root, params, trusted, checkpoints), request_id,
                        checkpoint(root, params, trusted, checkpoints))


def check_receipt(path: Path, trusted_keys: Sequence[str]) -> list[str]:
    """Verify a receipt file with no project: each KEY is a PEM public key file (every key in it is trusted) or a
    64-hex fingerprint."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path}: cannot read the receipt ({exc})") from exc
    except RecursionError:
        raise AuditError(f"{path}: not a receipt (JSON nested too deeply)") from None
    fingerprints = {f for given in trusted_keys
                    for f in (read_public_keys(Path(given)) if Path(given).is_file() else [given])}
    if not fingerprints or not all(re.fullmatch(r"[0-9a-f]{64}", f) for f in fingerprints):
        raise AuditError(f"--trusted-key {', '.join(trusted_keys)!r}: give PEM public key files or 64-hex "
                         "fingerprints")
    if not isinstance(data, dict):
        raise AuditError(f"{path}: not a receipt (a JSON object)")
    stmt = verify_receipt(data, fingerprints)
    p = stmt["predicate"]
    return [f"receipt of request {p['request_id']} (record {p['sequence']}, {p['status']}, recorded "
            f"{p['recorded_at']}): signed by key {p['signing_key_id'][:16]}",
            f"included in the signed checkpoint of {data['checkpoint'].splitlines()[1]} record(s)",
            f"{len(p.get('forgotten_ids', []))} sample(s) forgotten; model version "
            f"{p.get('registry', {}).get('model_version', '-')}",
            *([" ".join(f"{name} {at or '-'}" for name, at in p["times"].items())] if "times" in p else [])]


def report(root: Path, params: dict[str, Any], out: Path, trusted: Sequence[str] = (),
           checkpoints: Sequence[Path] = ()) -> Path:
    """A self-contained HTML page for a compliance officer: one section per request, of a verified log only."""
    log = audit_log(root, params, trusted, checkpoints)
    records = log.records()
    opener = _opener(root, params, log)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>legonet audit report</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}.ok{color:#060}.bad{color:#a00}"
             "</style></head><body><h1>legonet audit report</h1>",
             f"<p>Project: {_h(root.resolve())}. Records: {len(records)}. Log integrity: "
             "<span class='ok'>trusted signatures, hash chain and Merkle tree verified</span></p>"]
    for record in records:
        unseal_own = _unsealer(opener, record)
        p = opened(record, unseal_own)["predicate"]
        meta = unseal_own(p["sealed"]) if unseal_own and isinstance(p.get("sealed"), str) else {}
        rows = [("request", p["request_id"]), ("reason", meta.get("reason", "(sealed)")),
                ("received", meta.get("received_at", "(sealed)")), ("recorded", p["recorded_at"]),
                ("status", p["status"]), ("samples removed", len(p["forgotten_ids"])),
                ("not present / already forgotten", f"{len(p['not_present_ids'])} / {len(p['already_forgotten_ids'])}"),
                ("partitions rewritten", p["affected"]["partitions"]),
                ("adapters retrained", p["affected"].get("adapters", "(sealed)")),
                ("adapter files (Merkle root after)", f"{p['adapter_files']['files']} ({p['adapter_files']['after']})"),
                ("model version", f"{p['registry'].get('model_version', '-')} "
                                  f"{p['registry'].get('aliases', '')} {p['registry'].get('gate_reason', '')}"),
                ("purge", json.dumps(p["purge"], sort_keys=True)),
                ("timings (s)", json.dumps(p["timings_seconds"], sort_keys=True)),
                ("code revision", p["code_revision"]), ("signing key", p["signing_key_id"]),
                ("audit key", p["audit_key_id"]), ("platform", json.dumps(p["platform"], sort_keys=True))]
        checks = "".join(f"<li class='{'ok' if c.get('passed') is True else 'bad'}'>{_h(c.get('name'))}: "
                         f"{_h(c.get('detail'))}</li>" for c in p["checks"])
        parts.append(f"<h2>Request {_h(p['request_id'])} (record {_h(p['sequence'])})</h2><table>"
                     + "".join(f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in rows)
                     + f"</table><h3>Checks</h3><ul>{checks or '<li>no rebuild needed</li>'}</ul>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out


def _h(value: object) -> str:
    """Every value a record holds is escaped, whatever its type: the page must not run what a record says."""
    return html.escape(str(value), quote=True)
