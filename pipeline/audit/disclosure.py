"""What a forget's audit record publishes about the artifacts, and what it seals for the audit key holder.

Anyone who holds the data as it was before a forget can route every candidate sample to its adapters (routing is
public code over public keys), so a record that named the adapters a forget retrained, or listed each adapter
file's digest before and after, would narrow the forgotten sample to the few candidates with that adapter set.
The record therefore publishes the adapter files (adapters, their shards and the package's copies: every path
named ``adapter-NNNN.*``) only as RFC 9162 Merkle roots over ``path`` and digest, before and after, and seals the
list of retrained adapters, the per-path digests and the quality checkpoint's failures (which name adapters) under
the audit key (``seal``). The key holder opens them (``opened``) and checks each adapter against the roots; every
other changed artifact (raw and encoded partitions, routing index, quality result) is published by path with its
digests, which the data salt makes unpredictable without the project's data secret (pipeline.data.salt).
docs/audit.md, "What each published value reveals, and to whom", says what remains.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.audit.secrets import seal
from pipeline.audit.transparency import leaf_hash, root_hash

_NAMES_ADAPTER = re.compile(r"(^|/)adapter-\d+\.[a-z]+$")
SUBJECT = "models/adapters+package:adapter-files"  # the in-toto subject that stands for every adapter file


def names_adapter(path: str) -> bool:
    return bool(_NAMES_ADAPTER.search(path))


def adapter_root(digests: Mapping[str, str | None]) -> str:
    """RFC 9162 Merkle root (hex) over the adapter files of ``digests`` (path -> digest), sorted by path."""
    leaves = [leaf_hash(f"{p}\0{d}".encode()) for p, d in sorted(digests.items()) if names_adapter(p) and d]
    return root_hash(leaves).hex()


def changes(audit_key: bytes, before: Mapping[str, str], after: Mapping[str, str], adapters: list[int],
            quality: dict[str, Any]) -> dict[str, Any]:
    """The record's fields about what the forget changed: public ones, and the rest sealed (``sealed_changes``)."""
    touched = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    public = [p for p in touched if not names_adapter(p)]
    hidden = {p: {"before": before.get(p), "after": after.get(p)} for p in touched if names_adapter(p)}
    return {
        "artifacts": {p: {"before": before.get(p), "after": after.get(p)} for p in public},
        "adapter_files": {"before": adapter_root(before), "after": adapter_root(after),
                          "files": sum(names_adapter(p) for p in after)},
        "quality": {k: v for k, v in quality.items() if k != "failed_expectations"}
        | {"failed": len(quality.get("failed_expectations", []))},
        "sealed_changes": seal(audit_key, {
            "adapters": adapters, "artifacts": hidden,
            "adapter_files": {p: d for p, d in after.items() if names_adapter(p)},
            "failed_expectations": quality.get("failed_expectations", [])}),
    }


def opened(record: dict[str, Any], unseal: Callable[[str], dict[str, Any]] | None) -> dict[str, Any]:
    """The record with its sealed changes put back where a key holder reads them (``affected.adapters``, every
    changed artifact in ``artifacts``, the quality failures); as is for a reader without the key, or a record
    without sealed changes."""
    sealed = record["predicate"].get("sealed_changes")
    if unseal is None or not isinstance(sealed, str):
        return record
    inner = unseal(sealed)
    full = copy.deepcopy(record)
    predicate = full["predicate"]
    predicate["affected"]["adapters"] = inner["adapters"]
    predicate["artifacts"] = {**predicate["artifacts"], **inner["artifacts"]}
    predicate["quality"]["failed_expectations"] = inner["failed_expectations"]
    predicate["opened_adapter_files"] = inner["adapter_files"]
    return full


def root_problems(record: dict[str, Any]) -> list[str]:
    """An opened record's adapter files must give its published Merkle roots (after; and before, with the
    retrained files' before digests): otherwise the sealed list is not what was published."""
    predicate = record["predicate"]
    files = predicate.get("opened_adapter_files")
    if files is None:
        return []
    before = {**files, **{p: c["before"] for p, c in predicate["artifacts"].items() if names_adapter(p)}}
    return [f"request {predicate['request_id']}: sealed adapter digests do not give the published {when} root"
            for when, digests in (("before", before), ("after", files))
            if adapter_root(digests) != predicate["adapter_files"][when]]


def subjects(files: Mapping[str, str]) -> dict[str, str]:
    """In-toto subjects (path -> sha256): the adapter files folded into one Merkle root, so that two records'
    subjects do not show which adapters changed between them."""
    kept = {p: d for p, d in files.items() if not names_adapter(p)}
    return {**kept, SUBJECT: adapter_root(files)}
