"""The project's data secret, and the salt it gives every data artifact whose digest is published.

The digests of the data artifacts are public: git holds them (the ``.dvc`` files, dvc.lock) and so do the audit
records and receipts, and every writer is byte-stable. Without a secret, anyone who holds the data as it was before
a forget (a public dataset, an old clone) could write each candidate's removal and compare digests to find the
forgotten sample. So each artifact carries a salt, HMAC-SHA256(data secret, file name, the artifact's own metadata,
its content identity), where the content identity is its sorted sample IDs (a table without them: a hash of its
rows). The salt is deterministic, so a fresh build on the retained data with the same secret writes the same bytes
(the oracle holds), and it is unpredictable for any candidate row set without the secret, also to someone who holds
an older salted file. In a Parquet file the salt also decides a pad of 0 to ``PAD - 1`` bytes, because the file
size is published beside the digest and a compressed table's size would otherwise tell which row left.

The secret is 32 random bytes in the key dir (``pipeline.audit.keyring.key_dir``), created by `legonet init` only:
every digest depends on it, so a lost secret is an error that says to restore it, never a new one. It is not the
audit key (which can be rotated; this one cannot without changing every artifact). A file written outside any
project (no params.yaml and dvc.yaml above it) publishes nothing and is not salted.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import AuditError

SECRET = "data.secret"
SECRET_BYTES = 32
SALT_KEY = "legonet.salt"  # the metadata key (Parquet schema metadata, safetensors header, result JSON)
PAD = 4096
_LABEL = b"legonet data salt v1"
_secrets: dict[Path, bytes] = {}


def project_of(path: Path) -> Path | None:
    """The project folder a file belongs to (the nearest folder above it with params.yaml and dvc.yaml)."""
    for folder in path.resolve().parents:
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return None


def secret_path(root: Path) -> Path:
    # lazy: keyring and params import pipeline.data.dataset, which imports this module
    from pipeline.audit.keyring import key_dir
    from pipeline.project.params import load_params

    return key_dir(root, load_params(root)) / SECRET


def data_secret(root: Path) -> bytes:
    """The project's data secret; an AuditError naming the fix when it is missing (never a new one)."""
    from pipeline.audit.secrets import random_secret  # lazy: see secret_path

    root = root.resolve()
    if root not in _secrets:
        path = secret_path(root)
        secret = random_secret(path, SECRET_BYTES, create=False)
        if secret is None:
            raise AuditError(f"{path}: the project's data secret is missing; every data artifact's bytes depend on "
                             "it, so a new one would change every digest: restore the key dir from your backup (or "
                             "point LEGONET_KEY_DIR / audit.key_dir at it); a project made before legonet had data "
                             "secrets gets one from `legonet init --force --data FILE`")
        _secrets[root] = secret
    return _secrets[root]


def create_secret(root: Path, copy_from: Path | None = None) -> None:
    """Give a new project its data secret (`legonet init`): keep one that exists, else copy ``copy_from`` (a fresh
    build that must equal another project's, e.g. on its retained data), else draw a new one."""
    from pipeline.audit.secrets import random_secret  # lazy: see secret_path

    path = secret_path(root)
    existing = random_secret(path, SECRET_BYTES, create=False)
    if copy_from is not None:
        given = random_secret(copy_from, SECRET_BYTES, create=False)
        if given is None:
            raise AuditError(f"{copy_from}: no such data secret; give the `{SECRET}` file of the project's key dir")
        if existing is not None and existing != given:
            raise AuditError(f"{path}: this project already has another data secret; its artifacts depend on it")
        existing = existing or random_secret(path, SECRET_BYTES, create=True, value=given)
    if existing is None:
        random_secret(path, SECRET_BYTES, create=True)


def salt_of(path: Path, identity: Iterable[str]) -> str | None:
    """The salt of the artifact written at ``path`` holding ``identity`` (its metadata, then its sorted sample IDs
    or a digest of its rows), as 64 hex digits; None outside a project."""
    root = project_of(path)
    if root is None:
        return None
    mac = hmac.new(data_secret(root), _LABEL, hashlib.sha256)
    for part in (path.name, *identity):
        mac.update(part.encode("utf-8") + b"\0")
    return mac.hexdigest()


def padded(salt: str) -> str:
    """The salt as stored in a Parquet file: followed by a pad whose length (0..PAD-1) only the salt decides."""
    return salt + " " * (int(salt[:8], 16) % PAD)
