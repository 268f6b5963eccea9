"""The audit keys as an operator handles them (issue 22, item 3): where the key dir is, rotating the signing key
and the audit (HMAC) key, backing them up and restoring them, moving keys out of an older project's folder, and
no secret in params.yaml. The end-to-end test rotates both keys on a real project between two forgets (with a
build in between) and checks every reader of the log on records and receipts from before and after.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_project, legonet

from pipeline.audit import keyops
from pipeline.audit.checks import artifact_chain_problems
from pipeline.audit.envelope import key_id, parse_envelope, parse_statement
from pipeline.audit.keyring import IN_PROJECT, KEY_DIR_ENV, key_dir
from pipeline.audit.secrets import (
    audit_key_id,
    load_or_create_audit_key,
    load_or_create_signing_key,
    read_public_keys,
)
from pipeline.data.dataset import read_table
from pipeline.errors import AuditError, ParamsError
from pipeline.project.init import set_params
from pipeline.project.params import load_params

# --- where the keys live ---


def test_the_key_dir_is_per_user_by_project_id_and_overridable(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pid = uuid.uuid4().hex
    root = tmp_path / "project"
    root.mkdir()
    params: dict[str, Any] = {"project": {"id": pid}}
    data_home = Path(os.environ["XDG_DATA_HOME"])
    assert not data_home.is_relative_to(Path.home()), "tests must not write keys into the real home"
    assert key_dir(root, params) == data_home / "legonet" / "keys" / pid  # outside the project, named by its ID
    monkeypatch.setenv("XDG_DATA_HOME", "relative/path")  # XDG: ignored, the home's default applies
    assert key_dir(root, params) == Path.home() / ".local" / "share" / "legonet" / "keys" / pid
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))
    assert key_dir(root, {**params, "audit": {"key_dir": str(tmp_path / "set")}}) == tmp_path / "set"
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "env"))
    assert key_dir(root, {**params, "audit": {"key_dir": str(tmp_path / "set")}}) == tmp_path / "env"
    monkeypatch.delenv(KEY_DIR_ENV)
    (root / IN_PROJECT).mkdir(parents=True)  # a project made before the per-user default keeps its keys
    assert key_dir(root, params) == root / IN_PROJECT


def _keys(root: Path, params: dict[str, Any]) -> Path:
    """A key dir as forgets leave it, plus a retired audit key and a secret another part of legonet keeps."""
    keys = key_dir(root, params)
    load_or_create_signing_key(keys / "signing.key")
    load_or_create_audit_key(keys / "audit.key")
    load_or_create_audit_key(keys / "retired" / "audit-0123456789abcdef.key")
    (keys / "trusted-keys").write_text("f" * 64 + "  # pinned\n")
    (keys / "checkpoint").write_text("legonet.local/audit/x\n1\nAAAA\n")
    (keys / "verified-log.json").write_text("{}")  # the memo: rebuilt, never backed up
    load_or_create_audit_key(keys / "data.secret")
    return keys


def test_backup_and_restore_keep_every_key_and_never_overwrite(tmp_path: Path) -> None:
    root, params = tmp_path / "project", {"project": {"id": uuid.uuid4().hex}}
    keys = _keys(root, params)
    before = {p.relative_to(keys).as_posix(): p.read_bytes() for p in keys.rglob("*") if p.is_file()}
    dest = tmp_path / "backup.json"
    assert keyops.backup(root, params, dest) == 6
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(json.loads(dest.read_bytes())["files"]) == sorted(set(before) - {"verified-log.json"})
    with pytest.raises(AuditError, match="exists; choose a new file name"):
        keyops.backup(root, params, dest)
    for name in ("audit.key", "retired/audit-0123456789abcdef.key", "trusted-keys"):
        (keys / name).unlink()
    assert keyops.restore(root, params, dest) == (["audit.key", "retired/audit-0123456789abcdef.key",
                                                   "trusted-keys"], [])
    assert {p.relative_to(keys).as_posix(): p.read_bytes() for p in keys.rglob("*") if p.is_file()} == before
    assert stat.S_IMODE((keys / "audit.key").stat().st_mode) == 0o600
    assert keyops.restore(root, params, dest) == ([], [])  # all there: nothing to do
    (keys / "checkpoint").write_text("a newer checkpoint")  # a later forget's: kept, and said
    assert keyops.restore(root, params, dest) == ([], ["checkpoint"])
    (keys / "trusted-keys").unlink()
    (keys / "signing.key").write_bytes(b"another key")
    with pytest.raises(AuditError, match=r"signing\.key exist with other bytes than the backup's; nothing was"):
        keyops.restore(root, params, dest)
    assert not (keys / "trusted-keys").exists()  # checked first: nothing written
    with pytest.raises(AuditError, match="a backup of project"):
        keyops.restore(root, {"project": {"id": uuid.uuid4().hex}}, dest)
    document = json.loads(dest.read_bytes())
    document["files"]["../outside"] = base64.b64encode(b"x").decode()
    planted = tmp_path / "planted.json"
    planted.write_text(json.dumps(document))
    planted.chmod(0o600)
    with pytest.raises(AuditError, match="is not inside the key dir"):
        keyops.restore(root, params, planted)
    dest.chmod(0o644)
    with pytest.raises(AuditError, match="open to other users"):
        keyops.restore(root, params, dest)


def test_move_keys_takes_an_older_projects_keys_out_of_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / IN_PROJECT).mkdir(parents=True)
    (root / "params.yaml").write_text(f"project:\n  id: {uuid.uuid4().hex}\naudit:\n  key_dir: .legonet/keys  # "
                                      "the template's value before the per-user default\n")
    params = load_params(root)
    keys = _keys(root, params)
    assert keys == root / IN_PROJECT
    files = {p.relative_to(keys).as_posix(): p.read_bytes() for p in keys.rglob("*") if p.is_file()}
    target = keyops.move(root, params)
    params = load_params(root)
    assert params["audit"]["key_dir"] is None and "# the template's value" in (root / "params.yaml").read_text()
    assert target == key_dir(root, params) and not target.is_relative_to(root) and not keys.exists()
    files.pop("verified-log.json")
    assert {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()} == files
    with pytest.raises(AuditError, match="already outside the project folder"):
        keyops.move(root, params)
    (root / IN_PROJECT).mkdir()  # another copy's keys, clashing with those moved: refused, and put back
    load_or_create_audit_key(root / IN_PROJECT / "audit.key")
    with pytest.raises(AuditError, match="holds another key"):
        keyops.move(root, params)
    assert (root / IN_PROJECT / "audit.key").is_file()


# --- no secret in params.yaml ---


def test_a_password_in_params_is_refused_without_repeating_it(tmp_path: Path, tiny_data: Path) -> None:
    (tmp_path / "params.yaml").write_text("mlflow:\n  tracking_uri: http://mlflow-host:5000\n"
                                          "  backend_store_uri: postgresql://mlflow:s3cr3t@db-host:5432/mlflow\n")
    with pytest.raises(ParamsError, match=r"mlflow\.backend_store_uri holds a password") as caught:
        load_params(tmp_path)
    assert "s3cr3t" not in str(caught.value) and "~/.pgpass" in str(caught.value) and caught.value.exit_code == 4
    (tmp_path / "params.yaml").write_text("mlflow:\n  tracking_uri: http://user:s3cr3t@mlflow-host:5000\n")
    refused = legonet("audit", "verify", cwd=tmp_path, check=False)
    assert refused.returncode == 4 and "MLFLOW_TRACKING_PASSWORD" in refused.stderr, refused.stderr
    assert "s3cr3t" not in refused.stderr
    (tmp_path / "params.yaml").write_text("mlflow:\n  tracking_uri: sqlite:///mlflow.db\n  backend_store_uri: "
                                          "postgresql://mlflow@db-host/mlflow\n")
    assert load_params(tmp_path)["mlflow"]["tracking_uri"] == "sqlite:///mlflow.db"  # no password: fine
    fresh = tmp_path / "fresh"
    init = legonet("init", str(fresh), "--data", str(tiny_data), "--set",
                   "mlflow.backend_store_uri=postgresql://mlflow:s3cr3t@db-host:5432/mlflow", cwd=tmp_path, check=False)
    assert init.returncode == 4 and "holds a password" in init.stderr, init.stderr
    assert not (fresh / "params.yaml").exists()  # refused before anything was written


# --- each record starts from what the one before it left ---


def _forget(name: str, lock: tuple[str, str], artifacts: dict[str, tuple[str, str]],
            untouched: dict[str, str], batch: list[str] | None = None) -> dict[str, Any]:
    return {"request_id": name, "batch_request_ids": batch or [name],
            "dvc_lock": {"before": lock[0], "after": lock[1]}, "untouched_adapters": untouched,
            "artifacts": {path: {"before": b, "after": a} for path, (b, a) in artifacts.items()}}


def test_each_record_starts_from_what_the_forget_before_it_left() -> None:
    first = _forget("r1", ("L0", "L1"), {"data/raw/p0": ("a", "b"), "models/adapters/0": ("c", "d")},
                    {"models/adapters/1": "e"}, ["r1", "r2"])
    second = {**first, "request_id": "r2"}  # the same batch: one rebuild, the same artifacts
    follows = _forget("r3", ("L1", "L2"), {"data/raw/p0": ("b", "f"), "models/adapters/1": ("e", "g")},
                      {"models/adapters/0": "d"})
    assert artifact_chain_problems([first, second, follows]) == []
    bad_before = _forget("r3", ("L1", "L2"), {"data/raw/p0": ("X", "f")}, {"models/adapters/0": "d"})
    assert artifact_chain_problems([first, second, bad_before]) == [
        "record of request 'r3': data/raw/p0 starts from X, but request 'r1' left it at b (and dvc.lock did not "
        "change in between)"]
    bad_untouched = _forget("r3", ("L1", "L1"), {}, {"models/adapters/1": "Y"})
    assert "models/adapters/1 starts from Y" in artifact_chain_problems([first, bad_untouched])[0]
    built_between = _forget("r3", ("L9", "L10"), {"data/raw/p0": ("X", "f")}, {"models/adapters/0": "Z"})
    assert artifact_chain_problems([first, second, built_between]) == []  # a build changed dvc.lock in between
    split = {**second, "artifacts": {}}
    assert "states other artifacts" in artifact_chain_problems([first, split])[0]
    # records that publish the adapter files as one Merkle root (docs/audit.md): the roots chain the same way
    rooted = [{**_forget(r, lock, {}, {}), "adapter_files": {"before": b, "after": a, "files": 4}}
              for r, lock, b, a in (("r1", ("L0", "L1"), "R0", "R1"), ("r2", ("L1", "L2"), "R1", "R2"))]
    assert artifact_chain_problems(rooted) == []
    forged = {**rooted[1], "adapter_files": {"before": "RX", "after": "R2", "files": 4}}
    assert "adapter files (Merkle root) starts from RX" in artifact_chain_problems([rooted[0], forged])[0]


# --- rotation, backup and restore on a real project ---


def _statement(path: Path) -> dict[str, Any]:
    return parse_statement(parse_envelope(path.read_bytes())[1])


def _manifest(path: Path, request_id: str, ids: list[str]) -> str:
    path.write_text(json.dumps({"request_id": request_id, "sample_ids": ids, "reason": "GDPR Art. 17",
                                "received_at": "2024-05-01T09:30:00Z"}))
    return str(path)


def test_rotating_both_keys_between_forgets_keeps_every_record_receipt_and_id_checkable(
        built_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = copy_project(built_project, tmp_path / "project")  # keys in .legonet/keys: a project made before
    # the copy has the session project's ID: its per-user key dir must not be the one other copies start from
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    part0 = sorted(read_table(root / "data/routing.parquet").query("partition == 0")["sample_id"])
    first, second = part0[:2], part0[2:4]
    forgot = legonet("forget", _manifest(tmp_path / "a.json", "req-a", first), cwd=root)
    assert "legonet audit move-keys" in forgot.stderr  # the keys are in the project folder: say how to move them
    legonet("audit", "receipt", "req-a", "--output", str(tmp_path / "a-before.json"), cwd=root)

    moved = legonet("audit", "move-keys", cwd=root)
    keys = key_dir(root, load_params(root))
    assert f"moved the audit keys to {keys}" in moved.stdout and not (root / IN_PROJECT).exists()
    assert not keys.is_relative_to(root) and {"signing.key", "audit.key", "trusted-keys", "checkpoint"} <= \
        {p.name for p in keys.iterdir()}
    legonet("audit", "verify", cwd=root)
    foreign = keys / "data.secret"  # a secret another part of legonet keeps in the key dir: rotation leaves it
    load_or_create_audit_key(foreign)
    foreign_bytes = foreign.read_bytes()
    old_signer = key_id(load_or_create_signing_key(keys / "signing.key", create=False).public_key())
    old_hmac = audit_key_id(load_or_create_audit_key(keys / "audit.key", create=False))
    backup = legonet("audit", "backup-keys", str(tmp_path / "before-rotation.json"), cwd=root)
    assert "without the audit (HMAC) key" in backup.stderr and "exit 9" in backup.stderr
    again = legonet("audit", "backup-keys", str(tmp_path / "before-rotation.json"), cwd=root, check=False)
    assert again.returncode == 9 and "never replaces a file" in again.stderr

    assert legonet("audit", "rotate-key", cwd=root, check=False).returncode == 2  # which key: say it
    legonet("audit", "rotate-key", "--signing", "--hmac", cwd=root)
    new_signer = key_id(load_or_create_signing_key(keys / "signing.key", create=False).public_key())
    new_hmac = audit_key_id(load_or_create_audit_key(keys / "audit.key", create=False))
    assert new_signer != old_signer and new_hmac != old_hmac and foreign.read_bytes() == foreign_bytes
    assert sorted(p.name for p in (keys / "retired").iterdir()) == [f"audit-{old_hmac}.key",
                                                                    f"signing-{old_signer}.key"]
    names = sorted(p.name for p in (root / "audit/records").iterdir())
    assert names == ["000001-req-a.json", "000002-key-rotation-000002.json", "000003-audit-key-rotation-000003.json"]
    rotation = _statement(root / "audit/records" / names[2])["predicate"]
    assert (rotation["old_audit_key_id"], rotation["new_audit_key_id"], rotation["signing_key_id"]) == \
        (old_hmac, new_hmac, new_signer)
    legonet("audit", "backup-keys", str(tmp_path / "after-rotation.json"), cwd=root)

    set_params(root / "params.yaml", {"adapters.train.epochs": 9})  # a build between the forgets
    legonet("build", cwd=root)
    legonet("forget", _manifest(tmp_path / "b.json", "req-b", second), cwd=root)
    record = _statement(root / "audit/records/000004-req-b.json")["predicate"]
    assert (record["signing_key_id"], record["audit_key_id"]) == (new_signer, new_hmac)
    verified = legonet("audit", "verify", cwd=root)
    assert "2 forget record(s)" in verified.stdout and "each record starts from" in verified.stdout
    for sample_id, request in ((first[0], "req-a"), (second[1], "req-b")):
        found = legonet("audit", "check-id", sample_id, cwd=root)
        assert f"forgotten by request {request}" in found.stdout, found.stdout
    legonet("audit", "receipt", "req-a", "--output", str(tmp_path / "a-after.json"), cwd=root)
    legonet("audit", "receipt", "req-b", "--output", str(tmp_path / "b.json"), cwd=root)
    published = tmp_path / "signing-key.pub"  # a regulator's copy: verify-receipt needs no project
    published.write_bytes((root / "audit/signing-key.pub").read_bytes())
    assert set(read_public_keys(published)) == {old_signer, new_signer}
    for receipt in ("a-before.json", "a-after.json", "b.json"):
        checked = legonet("audit", "verify-receipt", str(tmp_path / receipt), "--trusted-key", str(published),
                          cwd=tmp_path)
        assert "ok: receipt of request req-" in checked.stdout, checked.stdout
    assert "checkpoint_public_key" in json.loads((tmp_path / "a-after.json").read_text())  # old record, new notary
    legonet("audit", "verify-receipt", str(tmp_path / "a-before.json"), "--trusted-key", old_signer, cwd=tmp_path)
    unpinned = legonet("audit", "verify-receipt", str(tmp_path / "b.json"), "--trusted-key", old_signer,
                       cwd=tmp_path, check=False)
    assert unpinned.returncode == 9 and "not a trusted key" in unpinned.stderr

    (keys / "retired" / f"audit-{old_hmac}.key").unlink()  # a lost retired key: req-a's IDs cannot be checked
    lost = legonet("audit", "check-id", first[0], cwd=root, check=False)
    assert lost.returncode == 9 and "restore" in lost.stderr, lost.stderr
    stale = legonet("audit", "restore-keys", str(tmp_path / "before-rotation.json"), cwd=root, check=False)
    assert stale.returncode == 9 and "nothing was restored" in stale.stderr  # its audit.key is the old one
    restored = legonet("audit", "restore-keys", str(tmp_path / "after-rotation.json"), cwd=root)
    assert f"restored 1 file(s): retired/audit-{old_hmac}.key" in restored.stdout
    assert "kept the key dir's own checkpoint" in restored.stdout  # forget req-b signed a newer one
    assert "forgotten by request req-a" in legonet("audit", "check-id", first[0], cwd=root).stdout
    legonet("audit", "verify", cwd=root)
