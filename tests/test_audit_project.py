"""The audit log against its own operator, on a real project: every tamper kind of issue 12 is caught by
`legonet audit verify` (exit 9, a message naming it), and none lets `forget`, `show` or `check-id` act on a
forged log. The table in docs/audit.md is this test's output: `LEGONET_WRITE_TAMPER_TABLE=1` rewrites it, and
otherwise the test fails if the document and the run disagree.

One project (built once per session) gets three records from two forgets (one rebuild); each tamper then works
on a private copy of it. The CLI runs in-process (`pipeline.cli.main.main`): the same code and exit codes as the
console script, without paying Python's start-up per call.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import copy_project, legonet
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.audit.envelope import canonical_json, key_id, parse_envelope, parse_statement
from pipeline.audit.log import AuditLog
from pipeline.audit.secrets import load_or_create_audit_key, load_or_create_signing_key, seal, unseal
from pipeline.audit.transparency import Checkpoint, leaf_hash, root_hash
from pipeline.cli import main as cli
from pipeline.data.dataset import read_table, write_table
from pipeline.tracking.digeststore import RACY_NS, DigestStore, stat_of

DOC = Path(__file__).resolve().parent.parent / "docs" / "audit.md"
TABLE_START, TABLE_END = "<!-- tamper-table:start -->", "<!-- tamper-table:end -->"
RECEIVED = "2024-05-01T09:30:00Z"
KEYS = Path(".legonet/keys")
RECORDS = Path("audit/records")


SCRIPT = "<script>alert(1)</script>"


def manifest(path: Path, request_id: str, ids: list[str], reason: str = "GDPR Art. 17") -> Path:
    """A request in the README's layout (what an attacker would guess too)."""
    path.write_text(json.dumps({"request_id": request_id, "sample_ids": ids, "reason": reason,
                                "received_at": RECEIVED}))
    return path


@pytest.fixture(scope="module")
def audited(built_project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three records: req-1 and req-2 (one batch, one rebuild), then req-3 re-asking req-1's IDs (no rebuild; its
    reason is markup, for the report). A checkpoint is kept after the batch (size 2) and after req-3 (size 3),
    as a data subject would keep one."""
    base = tmp_path_factory.mktemp("audited")
    root = copy_project(built_project, base / "project")
    routing = read_table(root / "data/routing.parquet")
    part0 = sorted(routing.loc[routing["partition"] == 0, "sample_id"])
    ids = {"req-1": part0[:2], "req-2": part0[2:3]}
    legonet("forget", str(manifest(base / "m1.json", "req-1", ids["req-1"])),
            str(manifest(base / "m2.json", "req-2", ids["req-2"])), cwd=root)
    shutil.copy(root / KEYS / "checkpoint", base / "older-checkpoint.txt")
    legonet("forget", str(manifest(base / "m3.json", "req-3", ids["req-1"], reason=SCRIPT)), cwd=root)
    shutil.copy(root / KEYS / "checkpoint", base / "newer-checkpoint.txt")
    assert sorted(p.name for p in (root / RECORDS).iterdir()) == \
        ["000001-req-1.json", "000002-req-2.json", "000003-req-3.json"]
    return {"root": root, "base": base, "ids": ids, "live": part0[3], "original": built_project,
            "older": base / "older-checkpoint.txt", "newer": base / "newer-checkpoint.txt",
            "commit": subprocess.run(["git", "rev-list", "--max-count=1", "--skip=1", "HEAD"], cwd=root,
                                     capture_output=True, text=True, check=True).stdout.strip()}


def run(root: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`legonet -C root ARGS...` in this process: its exit code and everything it printed."""
    here = os.getcwd()
    try:
        code = cli.main(["-C", str(root), *args])
    finally:
        os.chdir(here)
    out, err = capsys.readouterr()
    return code, out + err


# --- the tampers: each edits a private copy the way someone with write access to it could ---


def records(root: Path) -> list[Path]:
    return sorted((root / RECORDS).iterdir())


def flip_payload_byte(root: Path, ctx: dict[str, Any]) -> None:
    path = records(root)[1]
    data = bytearray(path.read_bytes())
    at = data.index(b'"payload":"') + 60
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    path.write_bytes(bytes(data))


def delete_newest(root: Path, ctx: dict[str, Any]) -> None:
    records(root)[-1].unlink()


def delete_middle(root: Path, ctx: dict[str, Any]) -> None:
    records(root)[1].unlink()


def reorder(root: Path, ctx: dict[str, Any]) -> None:
    first, second = records(root)[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)


def swap_signatures(root: Path, ctx: dict[str, Any]) -> None:
    first, second = records(root)[:2]
    a, b = json.loads(first.read_bytes()), json.loads(second.read_bytes())
    a["signatures"], b["signatures"] = b["signatures"], a["signatures"]
    first.write_bytes(canonical_json(a) + b"\n")
    second.write_bytes(canonical_json(b) + b"\n")


def _resign(root: Path, key: Ed25519PrivateKey, edit: Callable[[dict[str, Any]], None] = lambda p: None) -> None:
    """Rewrite the log with ``key``: every predicate through ``edit``, the chain rebuilt, the key published."""
    statements = [parse_statement(parse_envelope(p.read_bytes())[1]) for p in records(root)]
    scratch = root / "forged"
    log = AuditLog(scratch / "records", scratch / "signing-key.pub", {key_id(key.public_key())})
    for stmt in statements:
        predicate = {k: v for k, v in stmt["predicate"].items()
                     if k not in ("previous", "sequence", "signing_key_id")}
        edit(predicate)
        log.append(predicate, {s["name"]: s["digest"]["sha256"] for s in stmt["subject"]}, key)
    shutil.rmtree(root / RECORDS)
    (scratch / "records").rename(root / RECORDS)
    (scratch / "signing-key.pub").replace(root / "audit/signing-key.pub")
    scratch.rmdir()


def substitute_key(root: Path, ctx: dict[str, Any]) -> None:
    _resign(root, Ed25519PrivateKey.generate())


def substitute_and_repin(root: Path, ctx: dict[str, Any]) -> None:
    """The operator also controls the key dir: re-pins their new key and re-anchors the checkpoint."""
    forger = Ed25519PrivateKey.generate()
    _resign(root, forger)
    (root / KEYS / "trusted-keys").write_text(key_id(forger.public_key()) + "\n")
    _anchor(root, forger)


def _anchor(root: Path, key: Ed25519PrivateKey) -> None:
    """Sign a checkpoint of the log's files as they are now with ``key`` (whether they verify or not), under the
    log's name, and keep it in the key dir."""
    name = (root / KEYS / "checkpoint").read_text().splitlines()[0]
    leaves = [leaf_hash(path.read_bytes()) for path in records(root)]
    (root / KEYS / "checkpoint").write_text(Checkpoint(name, len(leaves), root_hash(leaves)).sign(key))


def _rewrite_with_the_real_key(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """The operator holds the real signing key: rewrites the records through ``edit``, re-chains, re-anchors."""
    key = load_or_create_signing_key(root / KEYS / "signing.key", create=False)
    _resign(root, key, edit)
    _anchor(root, key)


def rewrite_with_the_real_key(root: Path, ctx: dict[str, Any]) -> None:
    """req-2 rewritten to have forgotten nothing."""

    def hide(predicate: dict[str, Any]) -> None:
        if predicate["request_id"] == "req-2":
            predicate["forgotten_ids"] = []

    _rewrite_with_the_real_key(root, hide)


def rewrite_a_before(root: Path, ctx: dict[str, Any]) -> None:
    """req-3 (no rebuild) claims to start from other adapter files (their Merkle root) than the batch before it
    left."""

    def other_start(predicate: dict[str, Any]) -> None:
        if predicate["request_id"] == "req-3":
            predicate["adapter_files"]["before"] = "0" * 64

    _rewrite_with_the_real_key(root, other_start)


def reseal_an_adapter_digest(root: Path, ctx: dict[str, Any]) -> None:
    """req-1's sealed changes re-sealed under the real audit key with another after digest for one changed adapter
    file (the published roots as they were), re-signed, re-anchored."""
    audit_key = load_or_create_audit_key(root / KEYS / "audit.key", create=False)

    def other_digest(predicate: dict[str, Any]) -> None:
        if predicate["request_id"] == "req-1":
            inner = unseal(audit_key, predicate["sealed_changes"])
            inner["artifacts"][sorted(inner["adapter_proofs"])[0]]["after"] = "0" * 32
            predicate["sealed_changes"] = seal(audit_key, inner)

    _rewrite_with_the_real_key(root, other_digest)


def rewrite_the_audit_key_id(root: Path, ctx: dict[str, Any]) -> None:
    """req-3 keyed with an audit key no rotation introduced (its IDs would match under no key the log names)."""

    def other_key(predicate: dict[str, Any]) -> None:
        if predicate["request_id"] == "req-3":
            predicate["audit_key_id"] = "0" * 16

    _rewrite_with_the_real_key(root, other_key)


def rotate_to_an_unknown_audit_key(root: Path, ctx: dict[str, Any]) -> None:
    """A signed audit-key rotation to a key the key dir does not hold (the new key lost, or never kept)."""
    key = load_or_create_signing_key(root / KEYS / "signing.key", create=False)
    log = AuditLog(root / RECORDS, root / "audit/signing-key.pub", {key_id(key.public_key())})
    log.rotate_audit_key(load_or_create_audit_key(root / KEYS / "audit.key", create=False), os.urandom(32), key)
    _anchor(root, key)


def plant_unsigned(root: Path, ctx: dict[str, Any]) -> None:
    """An unsigned record for the request about to be made: once, `forget` then said "already-forgotten",
    exit 0, and removed nothing."""
    last = parse_statement(parse_envelope(records(root)[-1].read_bytes())[1])
    predicate = {**last["predicate"], "request_id": "req-new", "sequence": 4}
    envelope = {"payloadType": "application/vnd.in-toto+json",
                "payload": base64.b64encode(canonical_json({**last, "predicate": predicate})).decode(),
                "signatures": [{"keyid": "0" * 64, "sig": ""}]}
    (root / RECORDS / "000004-req-new.json").write_bytes(canonical_json(envelope) + b"\n")


def delete_hmac_key(root: Path, ctx: dict[str, Any]) -> None:
    (root / KEYS / "audit.key").unlink()


def delete_every_record(root: Path, ctx: dict[str, Any]) -> None:
    for path in records(root):
        path.unlink()


def rollback_log(root: Path, ctx: dict[str, Any]) -> None:
    """The log as git held it after the first forget (2 records)."""
    shutil.rmtree(root / "audit")
    subprocess.run(["git", "checkout", ctx["commit"], "--", "audit"], cwd=root, check=True, capture_output=True)


def rollback_log_and_anchor(root: Path, ctx: dict[str, Any]) -> None:
    rollback_log(root, ctx)
    shutil.copy(ctx["older"], root / KEYS / "checkpoint")


def change_adapter(root: Path, ctx: dict[str, Any]) -> None:
    path = sorted((root / "models/adapters").rglob("*.safetensors"))[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def change_adapter_and_its_stored_digest(root: Path, ctx: dict[str, Any]) -> None:
    """The adapter changed, and the project's digest store made to give its old digest for the new bytes."""
    path = sorted((root / "models/adapters").rglob("*.safetensors"))[0]
    old = hashlib.md5(path.read_bytes()).hexdigest()
    change_adapter(root, ctx)
    stat = stat_of(path.stat())
    DigestStore(root).put(path.relative_to(root).as_posix(), "md5", stat, stat[3] + 10 * RACY_NS, old)


def change_dvc_lock(root: Path, ctx: dict[str, Any]) -> None:
    lock = root / "dvc.lock"
    text = lock.read_text()
    at = text.index("md5: ") + 5
    lock.write_text(text[:at] + "0" * 32 + text[at + 32:])


def reinsert_row(root: Path, ctx: dict[str, Any]) -> None:
    """A forgotten row back in its raw partition, and `dvc add` run so its .dvc file matches."""
    part = Path("data/raw/part-0000.parquet")
    original = read_table(ctx["original"] / part)
    row = original[original["sample_id"] == ctx["ids"]["req-1"][0]]
    write_table(pd.concat([read_table(root / part), row], ignore_index=True), root / part)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", part.as_posix()], cwd=root, check=True)


def export_row(root: Path, ctx: dict[str, Any]) -> None:
    """A forgotten row in a table under reports/ that no stage wrote (someone's export next to the checkpoint's)."""
    original = read_table(ctx["original"] / "data/raw/part-0000.parquet")
    write_table(original[original["sample_id"] == ctx["ids"]["req-1"][0]], root / "reports/quality/export.parquet")


@dataclass(frozen=True)
class Tamper:
    what: str
    apply: Callable[[Path, dict[str, Any]], None]
    names_it: str  # the words of `audit verify`'s message that name the problem
    refused_by: tuple[str, ...] = ("show", "check-id", "forget")  # readers that must refuse (exit 9)
    reader_has: str = ""  # what the reader brings: "", "checkpoint" (one they kept) or "pin" (their own pin)
    readers_say: str = ""  # when the readers answer from a log that verifies: why that is right


OPERATOR = ("show", "check-id")  # the operator rewrote the key dir too: their own `forget` trusts it
GENUINE_LOG = ()
TAMPERS = [
    Tamper("edit one byte of a record's payload", flip_payload_byte, "000002-req-2.json: bad signature"),
    Tamper("delete the newest record", delete_newest, "records were deleted"),
    Tamper("delete a middle record", delete_middle, "000003-req-3.json: sequence jumps to 3"),
    Tamper("reorder two records", reorder, "file name says request 'req-1', the record 'req-2'"),
    Tamper("swap the signatures of two records", swap_signatures, "000001-req-1.json: bad signature"),
    Tamper("substitute the public key and re-sign the chain", substitute_key, "which is not trusted"),
    Tamper("... and also re-pin that key and re-anchor in the key dir", substitute_and_repin,
           "which is not trusted", OPERATOR, "pin"),
    Tamper("re-sign a rewritten history with the real key, re-anchor", rewrite_with_the_real_key,
           "the log was rewritten", OPERATOR, "checkpoint"),
    Tamper("plant an unsigned record for the next request", plant_unsigned,
           "000004-req-new.json: signed by key 0000000000000000"),
    Tamper("delete the HMAC audit key", delete_hmac_key, "the audit (HMAC) key is missing", ("check-id", "forget")),
    Tamper("delete every record", delete_every_record, "the log has 0 record(s)"),
    Tamper("roll the log back to an older commit", rollback_log, "the log has 2 record(s)"),
    Tamper("... and roll the key dir's checkpoint back too", rollback_log_and_anchor, "the log has 2 record(s)",
           OPERATOR, "checkpoint"),
    Tamper("change an adapter", change_adapter, "changed since the last record", GENUINE_LOG),
    Tamper("... and plant its old digest in the project's digest store", change_adapter_and_its_stored_digest,
           "changed since the last record", GENUINE_LOG),
    Tamper("change dvc.lock", change_dvc_lock, "dvc.lock changed since the last audited request", GENUINE_LOG),
    Tamper("re-insert a forgotten row, its .dvc file fixed", reinsert_row,
           "forgotten sample of request(s) req-1 is present in data/raw/part-0000.parquet", GENUINE_LOG),
    Tamper("write a forgotten row to a table under reports/", export_row,
           "forgotten sample of request(s) req-1 is present in reports/quality/export.parquet", GENUINE_LOG),
    Tamper("re-sign a record whose `before` is not what the forget before it left, re-anchor", rewrite_a_before,
           "but request 'req-1' left it at", GENUINE_LOG,
           readers_say="each record verifies on its own: they answer from it; the chain of states is "
                       "`audit verify`'s check"),
    Tamper("re-seal a record's changes with another digest for an adapter file, re-sign, re-anchor",
           reseal_an_adapter_digest, "request req-1: the sealed after digests of the changed adapter files do not "
           "give the published after root", GENUINE_LOG,
           readers_say="each record verifies on its own: they answer from it; the sealed digests against the "
                       "published roots are `audit verify`'s check, with the audit key"),
    Tamper("re-sign a record keyed with an audit key no rotation introduced, re-anchor", rewrite_the_audit_key_id,
           "keyed with audit key 0000000000000000, but the key in force is"),
    Tamper("sign a rotation to an audit key the key dir does not hold, re-anchor", rotate_to_an_unknown_audit_key,
           "restore the right key"),
]


def test_every_tamper_is_caught_and_no_reader_acts_on_a_forged_log(
        audited: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(audited["root"], "audit", "verify", capsys=capsys)
    assert code == 0, out
    pinned = key_id(load_or_create_signing_key(audited["root"] / KEYS / "signing.key", create=False).public_key())
    request = manifest(tmp_path / "new.json", "req-new", [audited["live"]])
    raw = (audited["root"] / "data/raw/part-0000.parquet").read_bytes()
    rows, failures = [], []
    for n, tamper in enumerate(TAMPERS):
        root = copy_project(audited["root"], tmp_path / f"case-{n}")
        tamper.apply(root, audited)
        kept = audited["newer"] if "roll" in tamper.what else audited["older"]
        reader = {"": [], "checkpoint": ["--checkpoint", str(kept)], "pin": ["--trusted-key", pinned]}
        code, out = run(root, "audit", "verify", *reader[tamper.reader_has], capsys=capsys)
        named = tamper.names_it in out and "Traceback" not in out
        readers = {"show": ("audit", "show", "req-1", *reader[tamper.reader_has]),
                   "check-id": ("audit", "check-id", audited["ids"]["req-1"][0], *reader[tamper.reader_has]),
                   "forget": ("forget", str(request))}
        verdicts = {name: run(root, *args, capsys=capsys)[0] for name, args in readers.items()
                    if name in tamper.refused_by}
        if code != 9 or not named or any(v != 9 for v in verdicts.values()):
            failures.append(f"{tamper.what}: verify exit {code}, named={named}, readers {verdicts}:\n{out}")
        if "forget" in verdicts:
            assert (root / "data/raw/part-0000.parquet").read_bytes() == raw, f"{tamper.what}: forget changed data"
            assert not (root / ".legonet/journal.json").exists(), f"{tamper.what}: forget journalled a request"
        rows.append(_row(tamper, code, named, verdicts))
        shutil.rmtree(root)
    assert not failures, "\n\n".join(failures)
    _check_table(rows)


def _row(tamper: Tamper, code: int, named: bool, verdicts: dict[str, int]) -> str:
    given = {"": "", "checkpoint": " `--checkpoint KEPT`", "pin": " `--trusted-key FINGERPRINT`"}[tamper.reader_has]
    readers = ", ".join(f"{name} exit {v}" for name, v in verdicts.items())
    if tamper.readers_say:
        readers = tamper.readers_say
    elif tamper.refused_by is GENUINE_LOG:
        readers = "the log is genuine: they answer from it"
    elif tamper.refused_by is OPERATOR:
        readers += " (given the same" + given + "); the operator's own `forget` trusts the key dir they rewrote"
    elif "show" not in verdicts:
        readers += "; `show` needs no key and shows the (intact) record"
    return f"| {tamper.what} | `audit verify`{given} | {code} | {'yes' if named else 'NO'}: " \
           f"\"{tamper.names_it}\" | {readers} |"


def _check_table(rows: list[str]) -> None:
    table = "\n".join(["| tamper | run | exit | message names it | show / check-id / forget on it |",
                       "|---|---|---|---|---|", *rows])
    text = DOC.read_text()
    head, rest = text.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    produced = f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}"
    if os.environ.get("LEGONET_WRITE_TAMPER_TABLE"):
        DOC.write_text(produced)
        return
    assert text == produced, "docs/audit.md's tamper table differs from this run: rerun with " \
                             "LEGONET_WRITE_TAMPER_TABLE=1 and commit the document"


# --- what a record reveals, receipts, the report, --rebuild, independent implementations ---


def statements(root: Path) -> list[dict[str, Any]]:
    return [parse_statement(parse_envelope(p.read_bytes())[1]) for p in records(root)]


def strings(value: object) -> list[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [str(value)]


def test_no_value_in_a_record_lets_anyone_test_a_guessed_id(audited: dict[str, Any]) -> None:
    """The issue's attack: try the README's manifest layout (with the request's public id, and even its true
    reason and date) for every sample ID of the project, and unkeyed hashes of every ID, against every value in
    every record. The control shows the attack is sound: it finds the manifest file's own digest."""
    root, base = audited["root"], audited["base"]
    ids = sorted({i for part in sorted((audited["original"] / "data").rglob("*.parquet"))
                  for i in read_table(part)["sample_id"]})
    assert len(ids) >= 900
    guesses: dict[str, str] = {}
    for sample_id in ids:
        for request_id in ("req-1", "req-2", "req-3"):
            for reason in ("GDPR Art. 17", SCRIPT):
                text = json.dumps({"request_id": request_id, "sample_ids": [sample_id], "reason": reason,
                                   "received_at": RECEIVED})
                guesses[hashlib.sha256(text.encode()).hexdigest()] = sample_id
        for digest in (hashlib.sha256, hashlib.md5, hashlib.sha1, hashlib.blake2b):
            guesses[digest(sample_id.encode()).hexdigest()] = sample_id
    control = hashlib.sha256((base / "m2.json").read_bytes()).hexdigest()
    assert guesses[control] == audited["ids"]["req-2"][0]  # an unkeyed manifest digest would give req-2's ID away
    values = [v for stmt in statements(root) for v in strings(stmt)]
    text = b"".join(p.read_bytes() for p in records(root)) + b"".join(
        base64.b64decode(json.loads(p.read_bytes())["payload"]) for p in records(root))
    assert not [v for v in values if v in guesses], "a record value confirms a guessed ID"
    assert not [i for i in ids if i.encode() in text], "a raw sample ID is in a record"
    assert "GDPR" not in " ".join(values) and RECEIVED not in " ".join(values)  # sealed


def test_a_receipt_verifies_with_no_project_by_cli_and_by_the_documented_script(
        audited: dict[str, Any], tmp_path: Path) -> None:
    root = copy_project(audited["root"], tmp_path / "project")
    legonet("audit", "receipt", "req-2", "--output", str(tmp_path / "receipt.json"), cwd=root)
    shutil.copy(root / "audit/signing-key.pub", tmp_path / "signing-key.pub")
    fingerprint = key_id(load_or_create_signing_key(root / KEYS / "signing.key", create=False).public_key())
    shutil.rmtree(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for key in ("signing-key.pub", fingerprint):
        ok = legonet("audit", "verify-receipt", str(tmp_path / "receipt.json"), "--trusted-key",
                     key if key == fingerprint else str(tmp_path / key), cwd=elsewhere)
        assert "ok: receipt of request req-2 (record 2, forgotten" in ok.stdout
    doc = DOC.read_text()
    script = doc.split("<!-- verifier:start -->\n```python\n")[1].split("```\n<!-- verifier:end -->")[0]
    (tmp_path / "verify_receipt.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no legonet on the path: cryptography only
    done = subprocess.run([sys.executable, "verify_receipt.py", "receipt.json", "signing-key.pub"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "verified: request req-2 (forgotten" in done.stdout, done.stderr
    receipt = json.loads((tmp_path / "receipt.json").read_text())
    receipt["leaf_index"] = 0
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    assert subprocess.run([sys.executable, "verify_receipt.py", "receipt.json", "signing-key.pub"], cwd=tmp_path,
                          capture_output=True, env=env).returncode != 0
    bad = legonet("audit", "verify-receipt", str(tmp_path / "receipt.json"), "--trusted-key", fingerprint,
                  cwd=elsewhere, check=False)
    assert bad.returncode == 9 and "not leaf 0 of the checkpointed tree" in bad.stderr


def test_report_escapes_every_value_and_opens_sealed_fields(audited: dict[str, Any], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert run(audited["root"], "audit", "report", "--output", str(out), capsys=capsys)[0] == 0
    page = out.read_text()
    assert "<script>" not in page and html.escape(SCRIPT) in page and "GDPR Art. 17" in page
    assert page.count("<h2>Request") == 3


def test_verify_rebuild_re_derives_in_a_temporary_directory(audited: dict[str, Any],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = audited["root"]
    before = {p: p.stat().st_mtime_ns for p in (root / "models").rglob("*") if p.is_file()}
    code, out = run(root, "audit", "verify", "--rebuild", capsys=capsys)
    assert code == 0 and "re-derived from scratch in a temporary directory: bit-identical" in out, out
    assert {p: p.stat().st_mtime_ns for p in (root / "models").rglob("*") if p.is_file()} == before


def test_records_verify_with_securesystemslib_and_validate_as_in_toto_statements(audited: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives import serialization
    from google.protobuf import json_format
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    root = audited["root"]
    public = serialization.load_pem_public_key((root / "audit/signing-key.pub").read_bytes())
    fingerprint = key_id(load_or_create_signing_key(root / KEYS / "signing.key", create=False).public_key())
    key = SSlibKey.from_crypto(public, keyid=fingerprint)
    for path in records(root):
        envelope = Envelope.from_dict(json.loads(path.read_bytes()))
        assert list(envelope.verify([key], 1)) == [fingerprint]
        proto = json_format.Parse(envelope.payload, statement_pb2.Statement())
        Statement.copy_from_pb(proto).validate()
        assert proto.predicate_type == "https://legonet.dev/forget/v2" and len(proto.subject) > 0
    tampered = json.loads(records(root)[0].read_bytes())
    tampered["payload"] = base64.b64encode(base64.b64decode(tampered["payload"]) + b" ").decode()
    with pytest.raises(VerificationError):
        Envelope.from_dict(tampered).verify([key], 1)


def test_build_takes_the_project_lock(audited: dict[str, Any]) -> None:
    """`legonet build` waits while a forget holds the lock, then finds the project up to date."""
    from pipeline.forget.flow import project_lock

    root = audited["root"]
    with project_lock(root, wait=False, notify=print):
        build = subprocess.Popen([sys.executable, "-m", "pipeline.cli.main", "build"], cwd=root, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        waiting = build.stderr.readline()
    out, err = build.communicate(timeout=600)
    assert "waiting for the project lock held by pid" in waiting, waiting + err
    assert build.returncode == 0 and "Data and pipelines are up to date." in out, err


def test_each_forget_tags_its_model_version_with_the_signed_checkpoint(audited: dict[str, Any],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    from pipeline.runner.build import CHECKPOINT_TAG

    root = audited["root"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    [latest] = sorted(client.search_model_versions("name='legonet'"), key=lambda v: int(v.version))[-1:]
    assert latest.tags[CHECKPOINT_TAG] == audited["older"].read_text()  # req-3 rebuilt nothing: no new version
    code, out = run(root, "audit", "checkpoint", capsys=capsys)
    assert code == 0 and out == audited["newer"].read_text()  # Ed25519 is deterministic: the same note
