"""Audit log: keys, DSSE signing, and detection of real tampering on the files themselves."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.audit import log as audit
from pipeline.audit.disclosure import adapter_root, changes, opened, root_problems
from pipeline.audit.envelope import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    canonical_json,
    key_id,
    sign_envelope,
    statement,
)
from pipeline.audit.log import AuditLog
from pipeline.audit.receipt import make_receipt, verify_receipt
from pipeline.audit.secrets import (
    audit_key_id,
    id_digest,
    load_or_create_audit_key,
    load_or_create_signing_key,
    public_key_pem,
    seal,
    unseal,
)
from pipeline.audit.transparency import Checkpoint, inclusion_proof, leaf_hash, root_hash
from pipeline.errors import AuditError
from pipeline.tracking import lineage

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64
FORGOTTEN = {"req-1": ["mnist-00001", "mnist-00002"], "req-2": ["mnist-00003"], "req-3": ["mnist-00004"]}


@pytest.fixture()
def signing_key(tmp_path: Path) -> Ed25519PrivateKey:
    return load_or_create_signing_key(tmp_path / "secrets" / "signing.pem")


@pytest.fixture()
def audit_key(tmp_path: Path) -> bytes:
    return load_or_create_audit_key(tmp_path / "secrets" / "audit.key")


@pytest.fixture(params=["every record", "memo"])
def log(request: pytest.FixtureRequest, tmp_path: Path, signing_key: Ed25519PrivateKey) -> AuditLog:
    """The log as a reader who pinned the signing key's fingerprint sees it: one who verifies every record, and
    the key holder who keeps a memo of the last clean pass beside the keys (every tampering test runs for both)."""
    memo = tmp_path / "secrets" / "verified-log.json" if request.param == "memo" else None
    return AuditLog(tmp_path / "audit" / "records", tmp_path / "audit" / "public_key.pem",
                    {key_id(signing_key.public_key())}, memo=memo)


@pytest.fixture()
def three(log: AuditLog, signing_key: Ed25519PrivateKey, audit_key: bytes) -> list[Path]:
    """A log of three records, one per request in ``FORGOTTEN``; with a memo, its reads that follow are a new
    process's (nothing verified in memory) that finds the three records in the memo."""
    paths = [
        log.append(
            {"request_id": request_id, "forgotten_ids": [id_digest(audit_key, i) for i in ids],
             "audit_key_id": audit_key_id(audit_key)},
            {"models/package/model.pkl": DIGEST_A, "models/adapters/adapter-0001.safetensors": DIGEST_B},
            signing_key,
        )
        for request_id, ids in FORGOTTEN.items()
    ]
    assert log.verify() == []
    if log.memo is not None:
        assert [name for name, _, _ in json.loads(log.memo.read_bytes())["records"]] == [p.name for p in paths]
        new_process()
    return paths


def new_process() -> None:
    """Forget what this process verified and read, as a new process would not know it."""
    audit._SCANS.clear()
    lineage._REMEMBERED.clear()  # the process's file cache (record files among them)


def payload_of(path: Path) -> dict:
    return json.loads(base64.b64decode(json.loads(path.read_bytes())["payload"]))


# --- keys ---


def test_audit_key_is_created_once_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "audit.key"
    key = load_or_create_audit_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_audit_key(path) == key
    assert load_or_create_audit_key(tmp_path / "other.key") != key
    assert [p.name for p in path.parent.iterdir()] == ["audit.key"]  # no temporary file left behind


def test_signing_key_is_pem_pkcs8_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    key = load_or_create_signing_key(path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_or_create_signing_key(path).public_key()) == key_id(key.public_key())


def test_keys_open_to_others_or_corrupt_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.key"
    load_or_create_audit_key(path)
    path.chmod(0o644)
    with pytest.raises(AuditError, match="chmod 600"):
        load_or_create_audit_key(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(AuditError, match="5 bytes, not 32"):
        load_or_create_audit_key(path)
    with pytest.raises(AuditError, match="not an unencrypted PEM private key"):
        load_or_create_signing_key(path)


def test_id_digest_is_keyed_hmac() -> None:
    assert id_digest(b"k" * 32, "mnist-1") == id_digest(b"k" * 32, "mnist-1")
    assert id_digest(b"k" * 32, "mnist-1") != id_digest(b"j" * 32, "mnist-1")
    assert id_digest(b"k" * 32, "mnist-1") != hashlib.sha256(b"mnist-1").hexdigest()


# --- statement and envelope ---


def test_statement_is_in_toto_v1_with_sorted_subjects() -> None:
    stmt = statement({"b.bin": DIGEST_B, "a.bin": DIGEST_A}, {"x": 1})
    assert stmt == {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": "a.bin", "digest": {"sha256": DIGEST_A}},
                    {"name": "b.bin", "digest": {"sha256": DIGEST_B}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"x": 1},
    }
    with pytest.raises(AuditError, match="not a lowercase SHA-256"):
        statement({"a.bin": "A" * 64}, {})


def test_envelope_is_dsse_over_pae(signing_key: Ed25519PrivateKey) -> None:
    stmt = statement({"a.bin": DIGEST_A}, {"reason": "ünïcode"})
    envelope = sign_envelope(stmt, signing_key)
    payload = base64.b64decode(envelope["payload"])
    expected = json.dumps(stmt, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert payload == expected and "ünïcode".encode() in payload
    assert envelope["payloadType"] == PAYLOAD_TYPE == "application/vnd.in-toto+json"
    [signature] = envelope["signatures"]
    raw = signing_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signature["keyid"] == hashlib.sha256(raw).hexdigest()
    pae = b"DSSEv1 28 application/vnd.in-toto+json %d %b" % (len(payload), payload)
    signing_key.public_key().verify(base64.b64decode(signature["sig"]), pae)  # raises if wrong


def test_canonical_json_refuses_non_json() -> None:
    with pytest.raises(AuditError, match="not plain JSON"):
        canonical_json({"t": float("nan")})
    with pytest.raises(AuditError, match="not plain JSON"):
        canonical_json({"p": Path("x")})


# --- the log: a clean history ---


def test_append_chains_and_verifies(log: AuditLog, three: list[Path]) -> None:
    assert [p.name for p in three] == ["000001-req-1.json", "000002-req-2.json", "000003-req-3.json"]
    assert log.verify() == []
    predicates = [s["predicate"] for s in log.records()]
    assert [p["sequence"] for p in predicates] == [1, 2, 3]
    assert predicates[0]["previous"] is None
    assert predicates[1]["previous"] == hashlib.sha256(three[0].read_bytes()).hexdigest()
    assert predicates[2]["previous"] == hashlib.sha256(three[1].read_bytes()).hexdigest()
    envelope = json.loads(three[0].read_bytes())
    assert three[0].read_bytes() == canonical_json(envelope) + b"\n"
    assert log.public_key_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_append_does_not_modify_the_callers_predicate(log: AuditLog, signing_key: Ed25519PrivateKey) -> None:
    predicate = {"request_id": "r1"}
    log.append(predicate, {}, signing_key)
    assert predicate == {"request_id": "r1"}


def test_find_and_find_id(log: AuditLog, three: list[Path], audit_key: bytes) -> None:
    found = log.find("req-2")
    assert found is not None and found["predicate"]["sequence"] == 2
    assert log.find("req-9") is None
    assert log.find_id([audit_key], "mnist-00002") == ["req-1"]
    assert log.find_id([audit_key], "mnist-00004") == ["req-3"]
    assert log.find_id([audit_key], "mnist-00005") == []  # never forgotten
    assert log.find_id([b"x" * 32], "mnist-00001") == []  # the wrong audit key finds nothing


def test_files_never_hold_raw_sample_ids(tmp_path: Path, three: list[Path]) -> None:
    stored = b"".join(p.read_bytes() for p in sorted(tmp_path.joinpath("audit").rglob("*")) if p.is_file())
    decoded = b"".join(base64.b64decode(json.loads(p.read_bytes())["payload"]) for p in three)
    for ids in FORGOTTEN.values():
        for sample_id in ids:
            assert sample_id.encode() not in stored
            assert sample_id.encode() not in decoded
            assert sample_id.encode("utf-16-le") not in stored


def test_append_twice_for_one_request_is_refused(log: AuditLog, three: list[Path],
                                                signing_key: Ed25519PrivateKey) -> None:
    with pytest.raises(AuditError, match="'req-2' already has an audit record"):
        log.append({"request_id": "req-2"}, {}, signing_key)
    assert len(log.records()) == 3


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ({"request_id": "../x"}, "must match"),
        ({}, "must match"),
        ({"request_id": "r9", "sequence": 7}, "must not set"),
        ({"request_id": "r9", "previous": None}, "must not set"),
    ],
)
def test_append_validates_the_predicate(log: AuditLog, signing_key: Ed25519PrivateKey, predicate: dict,
                                        expected: str) -> None:
    with pytest.raises(AuditError, match=expected):
        log.append(predicate, {}, signing_key)


def test_append_with_an_untrusted_key_is_refused(log: AuditLog, three: list[Path]) -> None:
    with pytest.raises(AuditError, match="is not trusted to sign this log"):
        log.append({"request_id": "req-4"}, {}, Ed25519PrivateKey.generate())
    assert len(log.records()) == 3


def test_empty_log(log: AuditLog) -> None:
    assert (log.records(), log.verify(), log.find("r"), log.find_id([b"k" * 32], "x")) == ([], [], None, [])


# --- the memo of the last clean pass ---


def memo_log(tmp_path: Path, trusted: set[str]) -> AuditLog:
    return AuditLog(tmp_path / "audit" / "records", tmp_path / "audit" / "public_key.pem", trusted,
                    memo=tmp_path / "secrets" / "verified-log.json")


@pytest.fixture()
def checked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The record files whose signatures a pass checks, in order (recorded by wrapping the real check)."""
    seen: list[str] = []
    real = audit.signature_problems

    def counting(envelope: dict, payload: bytes, *args: object) -> list[str]:
        seen.append(json.loads(base64.b64decode(envelope["payload"]))["predicate"]["request_id"])
        return real(envelope, payload, *args)

    monkeypatch.setattr(audit, "signature_problems", counting)
    return seen


def test_a_memo_spares_a_new_process_re_verifying_unchanged_records(tmp_path: Path, signing_key: Ed25519PrivateKey,
                                                                   checked: list[str]) -> None:
    trusted = {key_id(signing_key.public_key())}
    for request_id in ("req-1", "req-2", "req-3"):
        memo_log(tmp_path, trusted).append({"request_id": request_id}, {}, signing_key)
    assert checked == ["req-1", "req-2"]  # each append verifies only the record the pass before it did not
    new_process()
    checked.clear()
    log = memo_log(tmp_path, trusted)
    assert [s["request_id"] for s in log.summaries()] == ["req-1", "req-2", "req-3"]
    assert checked == ["req-3"]
    assert [s["predicate"]["request_id"] for s in log.records()] == ["req-1", "req-2", "req-3"]
    new_process()
    checked.clear()
    full = AuditLog(log.log_dir, log.public_key_path, trusted)  # `legonet audit verify`: no memo
    assert full.verify() == [] and checked == ["req-1", "req-2", "req-3"]


def test_a_memo_counts_only_under_the_trust_and_public_keys_it_was_made_with(
        tmp_path: Path, signing_key: Ed25519PrivateKey, checked: list[str]) -> None:
    trusted = {key_id(signing_key.public_key())}
    log = memo_log(tmp_path, trusted)
    for request_id in ("req-1", "req-2"):
        log.append({"request_id": request_id}, {}, signing_key)
    assert log.verify() == []
    new_process()
    stranger = key_id(Ed25519PrivateKey.generate().public_key())
    problems = memo_log(tmp_path, {stranger}).verify()  # another reader's trust: the memo proves nothing to it
    assert sum("not trusted to sign here" in p for p in problems) == 2, problems
    new_process()
    other = Ed25519PrivateKey.generate().public_key()
    log.public_key_path.write_bytes(log.public_key_path.read_bytes() + public_key_pem(other))
    checked.clear()
    assert memo_log(tmp_path, trusted).verify() == [] and checked == ["req-1", "req-2"]  # key file changed


@pytest.mark.parametrize("memo", [b"", b"{not json", b'{"format": 1}', b"[]"])
def test_a_corrupt_memo_is_ignored_and_replaced(tmp_path: Path, signing_key: Ed25519PrivateKey,
                                                checked: list[str], memo: bytes) -> None:
    trusted = {key_id(signing_key.public_key())}
    log = memo_log(tmp_path, trusted)
    for request_id in ("req-1", "req-2"):
        log.append({"request_id": request_id}, {}, signing_key)
    assert log.verify() == []
    log.memo.write_bytes(memo)
    new_process()
    checked.clear()
    assert memo_log(tmp_path, trusted).verify() == [] and checked == ["req-1", "req-2"]
    assert len(json.loads(log.memo.read_bytes())["records"]) == 2


# --- the log: tampering ---


def test_one_changed_payload_byte_is_a_bad_signature(log: AuditLog, three: list[Path]) -> None:
    data = bytearray(three[1].read_bytes())
    start = data.index(b'"payload":"') + len(b'"payload":"') + 40
    data[start] = ord("A") if data[start] != ord("A") else ord("B")
    three[1].write_bytes(bytes(data))
    problems = log.verify()
    assert any(p.startswith("000002-req-2.json: bad signature") for p in problems), problems
    assert any(p.startswith("000003-req-3.json: chain broken") for p in problems), problems  # 2's digest
    assert not [p for p in problems if p.startswith("000001")]


def test_an_edited_and_re_encoded_statement_is_a_bad_signature(log: AuditLog, three: list[Path],
                                                               audit_key: bytes) -> None:
    envelope = json.loads(three[0].read_bytes())
    stmt = payload_of(three[0])
    stmt["predicate"]["forgotten_ids"] = [id_digest(audit_key, "mnist-00001")]  # hide mnist-00002
    envelope["payload"] = base64.b64encode(canonical_json(stmt)).decode()
    three[0].write_bytes(canonical_json(envelope) + b"\n")
    assert any(p.startswith("000001-req-1.json: bad signature") for p in log.verify())


def test_deleting_the_middle_record_breaks_chain_and_sequence(log: AuditLog, three: list[Path]) -> None:
    three[1].unlink()
    problems = log.verify()
    assert "000003-req-3.json: sequence jumps to 3 after 000001-req-1.json; record(s) missing or renamed" \
        in problems
    assert any(p.startswith("000003-req-3.json: chain broken") and "000001-req-1.json" in p for p in problems)


def test_swapping_record_contents_is_detected(log: AuditLog, three: list[Path]) -> None:
    first, second = three[0].read_bytes(), three[1].read_bytes()
    three[0].write_bytes(second)
    three[1].write_bytes(first)
    problems = log.verify()
    assert "000001-req-1.json: file name says request 'req-1', the record 'req-2'" in problems
    assert "000002-req-2.json: file name says sequence 2, the record 1" in problems
    assert any(p.startswith("000003-req-3.json: chain broken") for p in problems)


def test_renumbering_records_is_detected(log: AuditLog, three: list[Path]) -> None:
    three[0].rename(three[0].with_name("000002-req-1.json"))
    three[1].rename(three[1].with_name("000001-req-2.json"))
    problems = log.verify()
    assert any(p.startswith("000001-req-2.json: file name says sequence 1, the record 2") for p in problems)
    assert any(p.startswith("000001-req-2.json: chain broken") for p in problems)


def test_a_duplicated_sequence_number_is_detected(log: AuditLog, three: list[Path]) -> None:
    three[2].rename(three[2].with_name("000002-req-3.json"))
    problems = log.verify()
    assert "000002-req-3.json: sequence number 2 is also used by 000002-req-2.json" in problems


def test_re_signing_with_another_key_is_an_unknown_keyid(log: AuditLog, three: list[Path]) -> None:
    stmt = payload_of(three[2])
    stmt["predicate"]["reason"] = "rewritten"
    three[2].write_bytes(canonical_json(sign_envelope(stmt, Ed25519PrivateKey.generate())) + b"\n")
    problems = log.verify()
    assert any(p.startswith("000003-req-3.json: signed by key") and "not trusted" in p for p in problems), problems


def test_undecodable_and_stray_files_are_reported(log: AuditLog, three: list[Path]) -> None:
    three[2].write_bytes(b"{not json")
    (log.log_dir / "notes.json").write_text("{}")
    problems = log.verify()
    assert any(p.startswith("000003-req-3.json: undecodable audit record") for p in problems), problems
    assert any("notes.json: not a record" in p for p in problems), problems
    with pytest.raises(AuditError, match=r"000003-req-3\.json: undecodable"):
        log.records()


@pytest.mark.parametrize("hide", ["subfolder", "bak", "dotfile", "empty folder", "dead writer's temp file"])
def test_every_file_in_the_records_folder_is_a_record_or_refused(log: AuditLog, three: list[Path],
                                                                 signing_key: Ed25519PrivateKey, hide: str) -> None:
    """A record signed by an untrusted key is refused wherever it sits; it is never silently skipped."""
    other = Ed25519PrivateKey.generate()
    planted = sign_envelope(statement({}, {"request_id": "req-x"}), other)
    data = json.dumps(planted).encode()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    target = {"subfolder": log.log_dir / "old" / "000004-req-x.json", "bak": log.log_dir / "000004-req-x.json.bak",
              "dotfile": log.log_dir / ".000004-req-x.json", "empty folder": log.log_dir / "later",
              "dead writer's temp file": log.log_dir / f".000004-req-x.json.tmp-{dead}"}[hide]
    if hide == "empty folder":
        target.mkdir()
    else:
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
    problems = log.verify()
    assert any(p.startswith(f"{target}: ") for p in problems), problems
    with pytest.raises(AuditError):
        log.records()


def test_a_record_being_written_is_not_a_stray(log: AuditLog, three: list[Path]) -> None:
    (log.log_dir / f".000004-req-4.json.tmp-{os.getpid()}").write_bytes(b"{")  # this process is writing it
    assert log.verify() == []


def test_a_records_folder_that_is_a_link_is_refused(log: AuditLog, three: list[Path], tmp_path: Path) -> None:
    """The log is the repository's folder: a link to a folder elsewhere (however valid its records) is refused."""
    elsewhere = tmp_path / "elsewhere"
    log.log_dir.rename(elsewhere)
    log.log_dir.symlink_to(elsewhere, target_is_directory=True)
    new_process()
    problems = log.verify()
    assert any(p.startswith(f"{log.log_dir}: is a symbolic link") for p in problems), problems
    with pytest.raises(AuditError, match="symbolic link"):
        log.records()


def test_a_missing_public_key_is_reported(log: AuditLog, three: list[Path]) -> None:
    log.public_key_path.unlink()
    assert any("cannot read the public key" in p for p in log.verify())


def test_append_refuses_a_tampered_log(log: AuditLog, three: list[Path],
                                       signing_key: Ed25519PrivateKey) -> None:
    three[1].unlink()
    with pytest.raises(AuditError, match="refusing to append to a log that does not verify"):
        log.append({"request_id": "req-4"}, {}, signing_key)


# --- trust: pinned fingerprints, planted records, substituted keys, rotation ---


def test_a_planted_unsigned_record_is_refused_by_every_reader(log: AuditLog, three: list[Path],
                                                             audit_key: bytes) -> None:
    stmt = statement({}, {"request_id": "req-9", "kind": "forget", "sequence": 4, "previous": None,
                          "forgotten_ids": [id_digest(audit_key, "mnist-00009")]})
    planted = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(canonical_json(stmt)).decode(),
               "signatures": [{"keyid": "0" * 64, "sig": ""}]}
    (log.log_dir / "000004-req-9.json").write_bytes(canonical_json(planted) + b"\n")
    problems = log.verify()
    assert any(p.startswith("000004-req-9.json: signed by key 0000000000000000, which is not trusted")
               for p in problems), problems
    for read in (log.records, lambda: log.find("req-9"), lambda: log.find_id([audit_key], "mnist-00009")):
        with pytest.raises(AuditError, match=r"does not verify, so nothing in it is used: 000004-req-9\.json"):
            read()


def test_a_substituted_public_key_and_re_signed_chain_is_not_trusted(log: AuditLog, three: list[Path]) -> None:
    """The operator replaces audit's public key with their own and re-signs a shortened, rewritten chain."""
    forger = Ed25519PrivateKey.generate()
    forged = AuditLog(log.log_dir.with_name("forged"), log.public_key_path.with_name("forged.pem"),
                      {key_id(forger.public_key())})
    for statement_ in log.records()[:2]:
        predicate = {k: v for k, v in statement_["predicate"].items()
                     if k not in ("previous", "sequence", "signing_key_id")}
        forged.append(predicate, {s["name"]: s["digest"]["sha256"] for s in statement_["subject"]}, forger)
    for path in three:
        path.unlink()
    for path in forged.log_dir.iterdir():
        path.rename(log.log_dir / path.name)
    log.public_key_path.write_bytes(forged.public_key_path.read_bytes())
    assert forged.verify() == []  # a self-consistent chain...
    problems = log.verify()  # ...that a reader who pinned the real key refuses
    assert any("not trusted" in p and "substituted or unpinned key" in p for p in problems), problems


def test_without_a_trusted_fingerprint_nothing_is_trusted(log: AuditLog, three: list[Path]) -> None:
    unpinned = AuditLog(log.log_dir, log.public_key_path)
    assert any("no trusted signing-key fingerprint" in p for p in unpinned.verify())
    with pytest.raises(AuditError, match="does not verify"):
        unpinned.records()


def test_key_rotation_is_a_record_signed_by_the_old_key(log: AuditLog, three: list[Path],
                                                        signing_key: Ed25519PrivateKey, audit_key: bytes) -> None:
    new_key = Ed25519PrivateKey.generate()
    rotation = log.rotate(signing_key, new_key.public_key())
    assert rotation.name == "000004-key-rotation-000004.json"
    log.append({"request_id": "req-5", "audit_key_id": audit_key_id(audit_key)}, {}, new_key)
    assert log.verify() == []  # a reader who pinned only the old key follows the rotation
    assert [r["predicate"]["request_id"] for r in log.records()] == ["req-1", "req-2", "req-3", "req-5"]
    assert log.active_keys() == {key_id(new_key.public_key())}
    with pytest.raises(AuditError, match="not trusted to sign this log"):  # the old key is retired
        log.append({"request_id": "req-6"}, {}, signing_key)
    predicate = payload_of(rotation)["predicate"]
    assert predicate["signing_key_id"] == key_id(signing_key.public_key())
    assert predicate["new_key_id"] == key_id(new_key.public_key())


def test_an_audit_key_rotation_keys_the_records_after_it(log: AuditLog, three: list[Path],
                                                         signing_key: Ed25519PrivateKey, audit_key: bytes) -> None:
    new_key = os.urandom(32)
    rotation = log.rotate_audit_key(audit_key, new_key, signing_key)
    assert rotation.name == "000004-audit-key-rotation-000004.json"
    predicate = payload_of(rotation)["predicate"]
    assert (predicate["old_audit_key_id"], predicate["new_audit_key_id"]) == (audit_key_id(audit_key),
                                                                              audit_key_id(new_key))
    log.append({"request_id": "req-5", "audit_key_id": audit_key_id(new_key),
                "forgotten_ids": [id_digest(new_key, "mnist-00005")]}, {}, signing_key)
    new_process()
    assert log.verify() == []
    assert log.audit_key_ids() == [audit_key_id(audit_key), audit_key_id(new_key)]
    assert [s["request_id"] for s in log.summaries()] == ["req-1", "req-2", "req-3", "req-5"]  # forgets only
    assert log.find_id([audit_key, new_key], "mnist-00002") == ["req-1"]  # each record under its own key
    assert log.find_id([audit_key, new_key], "mnist-00005") == ["req-5"]
    assert log.find_id([new_key], "mnist-00002") == []  # the retired key is needed for the records it keyed
    log.append({"request_id": "req-6", "audit_key_id": audit_key_id(audit_key)}, {}, signing_key)
    assert any("000006-req-6.json: keyed with audit key" in p and "the key in force is" in p for p in log.verify())


def test_an_audit_key_rotation_must_replace_the_key_in_force(log: AuditLog, three: list[Path],
                                                            signing_key: Ed25519PrivateKey) -> None:
    log.rotate_audit_key(os.urandom(32), os.urandom(32), signing_key)
    assert any("audit-key rotation replaces key" in p for p in log.verify())


def test_a_rotation_signed_by_an_untrusted_key_does_not_take_effect(log: AuditLog, three: list[Path]) -> None:
    intruder = Ed25519PrivateKey.generate()
    stmt = payload_of(three[2])["predicate"]
    with pytest.raises(AuditError, match="not trusted"):
        log.rotate(intruder, intruder.public_key())
    assert stmt["sequence"] == 3 and len(list(log.log_dir.iterdir())) == 3


# --- checkpoints: truncation and rewrites against a kept checkpoint ---


def test_checkpoints_catch_truncation_and_rollback(log: AuditLog, three: list[Path],
                                                  signing_key: Ed25519PrivateKey, audit_key: bytes) -> None:
    kept = log.checkpoint("legonet.local/audit/test", signing_key)
    assert kept.splitlines()[1] == "3" and log.extends(kept) == []
    log.append({"request_id": "req-4", "audit_key_id": audit_key_id(audit_key)}, {}, signing_key)
    assert log.extends(kept) == []  # the log grew: it still extends what was published
    sorted(log.log_dir.iterdir())[-1].unlink()
    three[2].unlink()  # drop the two newest: what is left is still an intact chain
    assert log.verify() == []
    assert log.extends(kept) == ["checkpoint: the log has 2 record(s), but a checkpoint signed for it has 3: "
                                 "records were deleted (truncated or rolled back)"]


def test_a_checkpoint_catches_history_re_signed_by_the_operator(log: AuditLog, three: list[Path],
                                                                signing_key: Ed25519PrivateKey) -> None:
    """The operator holds the signing key: they can rewrite a record and re-chain the rest, but not the past
    checkpoint someone kept."""
    kept = log.checkpoint("legonet.local/audit/test", signing_key)
    records = log.records()
    for path in three:
        path.unlink()
    records[1]["predicate"]["forgotten_ids"] = []  # pretend req-2 forgot nothing
    for record in records:
        predicate = {k: v for k, v in record["predicate"].items() if k not in ("previous", "sequence",
                                                                             "signing_key_id")}
        log.append(predicate, {s["name"]: s["digest"]["sha256"] for s in record["subject"]}, signing_key)
    assert log.verify() == []
    assert log.extends(kept) == ["checkpoint: the first 3 record(s) are not those the checkpoint signed: the log "
                                 "was rewritten (records changed, removed or reordered)"]


def test_a_checkpoint_by_an_untrusted_key_proves_nothing(log: AuditLog, three: list[Path]) -> None:
    intruder = Ed25519PrivateKey.generate()
    with pytest.raises(AuditError, match="not trusted"):
        log.checkpoint("legonet.local/audit/test", intruder)
    note = Checkpoint("legonet.local/audit/test", 9, b"\0" * 32).sign(intruder)
    assert log.extends(note)[0].startswith("checkpoint: not signed by a trusted key")


# --- secrets: no re-creation over records, no links, sealed free text ---


def test_lost_keys_are_not_recreated_when_asked_not_to(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=r"audit \(HMAC\) key is missing.*restore the key"):
        load_or_create_audit_key(tmp_path / "audit.key", create=False)
    with pytest.raises(AuditError, match="signing key is missing"):
        load_or_create_signing_key(tmp_path / "signing.key", create=False)
    assert list(tmp_path.iterdir()) == []


def test_a_key_reached_through_a_link_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.key"
    load_or_create_audit_key(real)
    (tmp_path / "audit.key").symlink_to(real)
    with pytest.raises(AuditError, match="not a link"):
        load_or_create_audit_key(tmp_path / "audit.key")
    (tmp_path / "dangling.key").symlink_to(tmp_path / "target-an-attacker-wants")
    with pytest.raises(AuditError, match="not a link"):
        load_or_create_audit_key(tmp_path / "dangling.key")
    assert not (tmp_path / "target-an-attacker-wants").exists()


def test_sealed_fields_open_only_under_the_audit_key(audit_key: bytes) -> None:
    sealed = seal(audit_key, {"reason": "GDPR Art. 17", "received_at": "2024-05-01"})
    assert b"GDPR" not in base64.b64decode(sealed)
    assert unseal(audit_key, sealed) == {"reason": "GDPR Art. 17", "received_at": "2024-05-01"}
    with pytest.raises(AuditError, match="do not open under this audit key"):
        unseal(b"x" * 32, sealed)
    assert audit_key_id(audit_key) != audit_key_id(b"x" * 32) and len(audit_key_id(audit_key)) == 16


# --- the adapter files of a record: Merkle roots, sealed leaf-update proofs, constant size in n ---


def adapter_digests(n: int, changed: Collection[int] = ()) -> dict[str, str]:
    """path -> md5 of the artifacts of a project with ``n`` adapters in two blocks (five files each, as a build
    writes them), the files of the ``changed`` adapters (and the routing index) with other digests."""
    out = {"data/routing.parquet": hashlib.md5(f"routing {bool(changed)}".encode()).hexdigest()}
    for j in range(n):
        block, name = f"block-{j * 2 // n:04d}", f"adapter-{j:04d}"
        for path in (f"data/shards/{block}/{name}.parquet", f"models/adapters/{block}/{name}.safetensors",
                     f"models/adapters/{block}/{name}.json", f"models/package/artifacts/adapters/{block}/{name}.json",
                     f"models/package/artifacts/adapters/{block}/{name}.safetensors"):
            out[path] = hashlib.md5(f"{path} {j in changed}".encode()).hexdigest()
    return out


def forget_record(key: bytes, before: dict[str, str], after: dict[str, str], adapters: list[int]) -> dict:
    """A forget record's predicate as `changes` makes it (the fields the adapter checks read), in a statement."""
    return {"predicate": {"request_id": "req-1", "affected": {"partitions": [0]},
                          **changes(key, before, after, adapters, {"passed": True, "failed_expectations": []})}}


def resealed(key: bytes, record: dict, edit: Callable[[dict], None]) -> dict:
    """``record`` with its sealed changes edited by someone who holds the audit key (the operator)."""
    inner = unseal(key, record["predicate"]["sealed_changes"])
    edit(inner)
    return {"predicate": {**record["predicate"], "sealed_changes": seal(key, inner)}}


def problems_of(key: bytes, record: dict) -> list[str]:
    return root_problems(opened(record, lambda sealed: unseal(key, sealed)))


@pytest.mark.parametrize("retrained", [[5], [0, 1, 31], list(range(32))])
def test_a_record_seals_proofs_that_give_both_published_roots(audit_key: bytes, retrained: list[int]) -> None:
    """One, several and every adapter retrained: the sealed changes name exactly the changed adapter files, and
    their leaf-update proofs lead from the published before root to the published after root."""
    before, after = adapter_digests(32), adapter_digests(32, retrained)
    record = forget_record(audit_key, before, after, retrained)
    predicate = record["predicate"]
    assert predicate["adapter_files"] == {"before": adapter_root(before), "after": adapter_root(after), "files": 160}
    assert list(predicate["artifacts"]) == ["data/routing.parquet"]  # no adapter file is public
    full = opened(record, lambda sealed: unseal(audit_key, sealed))["predicate"]
    assert sorted(full["opened_adapter_proofs"]) == sorted(p for p in full["artifacts"] if "adapter-" in p)
    assert len(full["opened_adapter_proofs"]) == 5 * len(retrained) and "opened_adapter_files" not in full
    assert full["affected"]["adapters"] == retrained
    assert problems_of(audit_key, record) == []


def test_a_tampered_sealed_proof_or_digest_is_named(audit_key: bytes) -> None:
    """The operator holds the audit key and re-seals: each lie about the adapter files is caught, by name."""
    before, after = adapter_digests(32), adapter_digests(32, [3, 20])
    record = forget_record(audit_key, before, after, [3, 20])
    shard = "data/shards/block-0000/adapter-0003.parquet"

    def other_before(inner: dict) -> None:
        inner["artifacts"][shard]["before"] = "0" * 32

    def flipped_node(inner: dict) -> None:
        node = inner["adapter_proofs"][shard]["proof"][2]
        inner["adapter_proofs"][shard]["proof"][2] = ("1" if node[0] == "0" else "0") + node[1:]

    def other_after(inner: dict) -> None:
        inner["artifacts"][shard]["after"] = "0" * 32

    def hidden_file(inner: dict) -> None:  # a changed file left out of the sealed changes and of the proofs
        del inner["artifacts"][shard], inner["adapter_proofs"][shard]

    def missing_proof(inner: dict) -> None:
        del inner["adapter_proofs"][shard]

    def bad_index(inner: dict) -> None:
        inner["adapter_proofs"][shard]["index"] = "three"

    not_in_before = f"request req-1: {shard}: the sealed proof does not show its sealed before digest in the " \
                    "adapter files' published before root"
    not_after = "request req-1: the sealed after digests of the changed adapter files do not give the published " \
                "after root: another adapter file changed, or a sealed digest is wrong"
    for edit, expected in [(other_before, not_in_before), (flipped_node, not_in_before), (other_after, not_after),
                           (hidden_file, not_after),
                           (missing_proof, "request req-1: the sealed proofs name 9 adapter file(s), the sealed "
                                           "changes 10 other ones"),
                           (bad_index, "request req-1: malformed sealed proof or published root (TypeError")]:
        found = problems_of(audit_key, resealed(audit_key, record, edit))
        assert len(found) == 1 and found[0].startswith(expected), (edit.__name__, found)
    # the public side: a root rewritten (and re-signed) no longer matches the sealed proofs
    forged = {"predicate": {**record["predicate"], "adapter_files": {**record["predicate"]["adapter_files"],
                                                                     "after": adapter_root(before)}}}
    assert problems_of(audit_key, forged) == [not_after]


def test_a_forget_that_adds_or_removes_an_adapter_file_seals_every_digest(audit_key: bytes) -> None:
    """The tree's size changes, so no leaf-update proof exists: the record seals every adapter file's digest after
    (as records made before the proofs do), and both roots are recomputed from it."""
    before = adapter_digests(32)
    after = {p: d for p, d in adapter_digests(32, [7]).items() if not p.endswith("adapter-0031.json")}
    record = forget_record(audit_key, before, after, [7])
    full = opened(record, lambda sealed: unseal(audit_key, sealed))["predicate"]
    assert "opened_adapter_proofs" not in full and len(full["opened_adapter_files"]) == 158
    assert record["predicate"]["adapter_files"]["files"] == 158 and problems_of(audit_key, record) == []

    def other_digest(inner: dict) -> None:
        inner["adapter_files"]["data/shards/block-0000/adapter-0001.parquet"] = "0" * 32

    assert problems_of(audit_key, resealed(audit_key, record, other_digest)) == [
        f"request req-1: sealed adapter digests do not give the published {when} root" for when in ("before", "after")]


def test_a_record_does_not_grow_with_the_number_of_adapters(audit_key: bytes) -> None:
    """Three adapters retrained at n = 32 and at n = 1,024: the record (its public and its sealed fields) differs
    by the proofs' length, O(log n), not by a digest per adapter file; and which leaves changed does not show in the
    sealed length."""
    sizes = {}
    for n in (32, 1024):
        retrained = [1, n // 2, n - 1]
        record = forget_record(audit_key, adapter_digests(n), adapter_digests(n, retrained), retrained)
        sizes[n] = len(canonical_json(record["predicate"]))
    full_map = seal(audit_key, {"adapter_files": adapter_digests(1024)})  # what a record sealed before, at n = 1,024
    assert sizes[1024] < 1.5 * sizes[32] and sizes[1024] < len(full_map) / 20, (sizes, len(full_map))
    lengths = {len(forget_record(audit_key, adapter_digests(32), adapter_digests(32, retrained), retrained)
                   ["predicate"]["sealed_changes"]) for retrained in ([10, 11, 12], [13, 14, 15], [29, 30, 31])}
    assert len(lengths) == 1, lengths  # padded: the proofs' length does not show where the changed leaves sit
    # (adapters 29-31's package copies are leaves 128.. of 160, whose audit paths are two nodes shorter)


# --- receipts ---


def test_a_receipt_verifies_offline_and_refuses_tampering(log: AuditLog, three: list[Path],
                                                         signing_key: Ed25519PrivateKey) -> None:
    fingerprint = key_id(signing_key.public_key())
    receipt = make_receipt(log, "req-2", log.checkpoint("legonet.local/audit/test", signing_key))
    assert verify_receipt(receipt, fingerprint)["predicate"]["request_id"] == "req-2"
    assert receipt["leaf_index"] == 1 and receipt["record"].encode() == three[1].read_bytes()
    with pytest.raises(AuditError, match="not a trusted key"):
        verify_receipt(receipt, "0" * 64)
    other = {**receipt, "record": three[2].read_text()}
    with pytest.raises(AuditError, match="not leaf 1 of the checkpointed tree"):
        verify_receipt(other, fingerprint)
    moved = {**receipt, "checkpoint": receipt["checkpoint"].replace("\n3\n", "\n4\n", 1)}
    with pytest.raises(AuditError, match="checkpoint: bad signature"):
        verify_receipt(moved, fingerprint)
    with pytest.raises(AuditError, match="no audit record for request 'req-9'"):
        make_receipt(log, "req-9", receipt["checkpoint"])


def test_a_receipt_follows_the_signed_note_and_dsse_specs(log: AuditLog, three: list[Path],
                                                          signing_key: Ed25519PrivateKey) -> None:
    """C2SP signed-note: the note ends with a newline, and every signature line by the key must verify (a good
    one first does not excuse a bad one). DSSE: URL-safe base64 and a missing keyid are both allowed."""
    fingerprint = key_id(signing_key.public_key())
    receipt = make_receipt(log, "req-2", log.checkpoint("legonet.local/audit/test", signing_key))
    with pytest.raises(AuditError, match="ends with a newline"):
        verify_receipt({**receipt, "checkpoint": receipt["checkpoint"].rstrip("\n")}, fingerprint)
    good = receipt["checkpoint"].splitlines()[-1]
    name, blob = good.removeprefix("\u2014 ").split(" ")
    raw = base64.b64decode(blob)
    bad = f"\u2014 {name} {base64.b64encode(raw[:4] + bytes(64)).decode()}"
    with pytest.raises(AuditError, match="bad signature"):
        verify_receipt({**receipt, "checkpoint": receipt["checkpoint"] + bad + "\n"}, fingerprint)

    envelope = json.loads(receipt["record"])
    url_safe = {**envelope, "payload": base64.urlsafe_b64encode(base64.b64decode(envelope["payload"])).decode()
                .rstrip("="),
                "signatures": [{"sig": base64.urlsafe_b64encode(base64.b64decode(s["sig"])).decode()}
                               for s in envelope["signatures"]]}
    assert "keyid" not in url_safe["signatures"][0]
    assert url_safe["payload"] != envelope["payload"]
    # the record's bytes are its Merkle leaf: re-encode it in a log of its own and prove that one
    respelled = AuditLog(log.log_dir.parent / "respelled", log.public_key_path, log.trusted)
    respelled.log_dir.mkdir()
    for index, path in enumerate(three):
        data = json.dumps(url_safe).encode() if index == 1 else path.read_bytes()
        (respelled.log_dir / path.name).write_bytes(data)
    hashes = [leaf_hash(p.read_bytes()) for p in sorted(respelled.log_dir.iterdir())]
    note = Checkpoint("legonet.local/audit/test", 3, root_hash(hashes)).sign(signing_key)
    spelled = {**receipt, "record": json.dumps(url_safe), "checkpoint": note,
               "inclusion_proof": [base64.b64encode(h).decode() for h in inclusion_proof(hashes, 1)]}
    assert verify_receipt(spelled, fingerprint)["predicate"]["request_id"] == "req-2"


def test_a_deeply_nested_receipt_is_an_audit_error(tmp_path: Path, signing_key: Ed25519PrivateKey) -> None:
    from pipeline.audit.review import check_receipt

    path = tmp_path / "receipt.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AuditError, match="nested too deeply"):
        check_receipt(path, [key_id(signing_key.public_key())])


# --- where the keys may live, the journal, the commit, paths from DVC's files ---


def git_project(root: Path) -> Path:
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / ".gitignore").write_text("/.legonet/\n")
    return root


@pytest.mark.parametrize(("configured", "expected"), [
    ("audit/keys", "inside audit/, which is committed to git"),
    ("keys", "not ignored by git"),
])
def test_a_key_dir_git_would_commit_is_refused(tmp_path: Path, configured: str, expected: str) -> None:
    from pipeline.audit.keyring import key_dir

    root = git_project(tmp_path / "project")
    with pytest.raises(AuditError, match=expected):
        key_dir(root, {"audit": {"key_dir": configured}})
    assert key_dir(root, {"audit": {"key_dir": ".legonet/keys"}}) == root / ".legonet/keys"
    assert key_dir(root, {"audit": {"key_dir": str(tmp_path / "outside")}}) == tmp_path / "outside"


def test_the_journal_of_raw_ids_is_private(tmp_path: Path) -> None:
    from pipeline.forget.requests import JOURNAL, Journal

    Journal("b", ["r"], {}, ["mnist-00001"], {}, {}, {}).save(tmp_path)
    assert stat.S_IMODE((tmp_path / JOURNAL).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / JOURNAL).parent.stat().st_mode) == 0o700
    assert Journal.load(tmp_path).sample_ids == ["mnist-00001"]


def test_a_failed_git_commit_after_a_forget_is_an_error(tmp_path: Path) -> None:

    from pipeline.errors import ForgetError
    from pipeline.forget.steps import commit

    root = git_project(tmp_path / "project")
    (root / "audit").mkdir()
    (root / "audit" / "record.json").write_text("{}")
    hook = root / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho refused by policy >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(ForgetError, match="`git commit` of the forget failed: refused by policy"):
        commit(root, ["req-1"])
    hook.unlink()
    commit(root, ["req-1"])
    commit(root, ["req-1"])  # nothing left to commit is not an error


def test_md5_values_from_dvc_files_are_checked_before_they_become_paths(tmp_path: Path) -> None:
    from pipeline.audit.review import _workspace_problems

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  s:\n    outs:\n    - path: a\n"
                                       "      md5: ../../../../etc/passwd\n")
    assert _workspace_problems(tmp_path) == ["a: recorded md5 '../../../../etc/passwd' is not an md5 hash"]


def test_a_planted_fifo_link_or_deeply_nested_record_is_reported_not_followed(log: AuditLog, three: list[Path],
                                                                             tmp_path: Path) -> None:
    import os

    os.mkfifo(log.log_dir / "000004-req-4.json")
    (log.log_dir / "000005-req-5.json").symlink_to(three[0])
    problems = log.verify()  # returns: reading the FIFO would block forever
    assert any("000004-req-4.json: not a record (a regular file" in p for p in problems), problems
    assert any("000005-req-5.json: not a record (a regular file" in p for p in problems), problems
    (log.log_dir / "000004-req-4.json").unlink()
    (log.log_dir / "000005-req-5.json").unlink()
    three[2].write_bytes(b"[" * 100_000 + b"]" * 100_000)
    assert any(p.startswith("000003-req-3.json: undecodable audit record") for p in log.verify())
