"""What a forget's audit record publishes about the artifacts, and what it seals for the audit key holder.

Anyone who holds the data as it was before a forget can route every candidate sample to its adapters (routing is
public code over public keys), so a record that named the adapters a forget retrained, or listed each adapter
file's digest before and after, would narrow the forgotten sample to the few candidates with that adapter set.
The record therefore publishes the adapter files (adapters, their shards and the package's copies: every path named
``adapter-NNNN.*``) only as RFC 9162 Merkle roots over ``path`` and digest, before and after, and seals the list of
retrained adapters, the changed files' digests before and after and the quality checkpoint's failures (which name
adapters) under the audit key (``seal``); every other changed artifact (raw and encoded partitions, routing index,
quality result) is published by path with its digests, which the data salt makes unpredictable without the
project's data secret (pipeline.data.salt).

A record's size must not grow with the number of adapters, so it seals no digest of an untouched adapter file:
with the changed files' digests it seals, for each, a leaf-update proof (pipeline.audit.transparency), O(log n).
The key holder (``opened``, ``root_problems``) replays them from the published before root: each changed file's
before digest is its leaf there, and replacing those leaves by the after digests gives the published after root,
so every other adapter file kept its digest (O(changed x log n) per record). Consecutive records chain their roots
(pipeline.audit.checks), and `audit verify` recomputes the last record's after root from the project's adapter
files (pipeline.audit.review), so the log states every adapter file's digest without listing one. A forget whose
adapter files are not the same paths before and after (the set follows ``adapters.n``; the tree's size changes)
has no such proof: its record seals every adapter file's digest after, O(n), and the key holder recomputes both
roots. That the retrained adapters' bits are the training's on the retained data, only `audit verify --rebuild`
shows (it re-derives the last forget's retrained adapters and compares bits).

docs/audit.md, "What each published value reveals, and to whom", says what remains.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

from pipeline.audit.envelope import canonical_json
from pipeline.audit.secrets import seal
from pipeline.audit.transparency import (
    HASH_SIZE,
    inclusion_proofs,
    leaf_hash,
    root_hash,
    updated_root,
    verify_inclusion,
)

_NAMES_ADAPTER = re.compile(r"(^|/)adapter-\d+\.[a-z]+$")
SUBJECT = "models/adapters+package:adapter-files"  # the in-toto subject that stands for every adapter file


def names_adapter(path: str) -> bool:
    return bool(_NAMES_ADAPTER.search(path))


def adapter_root(digests: Mapping[str, str | None]) -> str:
    """RFC 9162 Merkle root (hex) over the adapter files of ``digests`` (path -> digest), sorted by path."""
    return root_hash(_leaves(digests)[1]).hex()


def _leaves(digests: Mapping[str, str | None]) -> tuple[list[str], list[bytes]]:
    """The adapter files' paths, sorted, and their leaf hashes: the leaves of ``adapter_root``'s tree."""
    paths = sorted(p for p, d in digests.items() if names_adapter(p) and d)
    return paths, [_leaf(p, digests[p]) for p in paths]


def _leaf(path: str, digest: str | None) -> bytes:
    return leaf_hash(f"{path}\0{digest}".encode())


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
            "adapters": adapters, "artifacts": hidden, **_root_evidence(before, after),
            "failed_expectations": quality.get("failed_expectations", [])}),
    }


def _root_evidence(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, Any]:
    """What lets the key holder check the sealed adapter digests against the two published roots.

    The same files before and after (a forget rewrites adapter files, it does not add or remove one): for each
    changed file, its leaf's index and audit path in the before tree, O(changed x log n); with the after digests
    they give the after root (``updated_root``). Files added or removed (the tree's size changes): indices shift,
    no such proof exists, and the digest of every adapter file after is sealed, O(n), from which both roots are
    recomputed."""
    old_paths, old = _leaves(before)
    new_paths, new = _leaves(after)
    if old_paths != new_paths:
        return {"adapter_files": {p: d for p, d in after.items() if names_adapter(p)}}
    changed = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    proofs = {old_paths[i]: {"index": i, "proof": [node.hex() for node in path]}
              for i, path in zip(changed, inclusion_proofs(old, changed), strict=True)}
    return {"adapter_proofs": proofs, "pad": _pad(proofs, len(old))}


def _pad(proofs: dict[str, Any], size: int) -> str:
    """Spaces that bring the proofs' sealed length to that of as many proofs of the longest path and index: the
    sealed length then tells how many adapter files changed (as the sealed digests' length does), not where their
    leaves sit (a path is shorter in the right part of a tree whose size is not a power of two)."""
    longest = {p: {"index": size - 1, "proof": ["0" * 2 * HASH_SIZE] * (size - 1).bit_length()} for p in proofs}
    return " " * (len(canonical_json(longest)) - len(canonical_json(proofs)))


def opened(record: dict[str, Any], unseal: Callable[[str], dict[str, Any]] | None) -> dict[str, Any]:
    """The record with its sealed changes put back where a key holder reads them (``affected.adapters``, every
    changed artifact in ``artifacts``, the quality failures, the evidence for the roots); as is for a reader
    without the key, or a record without sealed changes."""
    sealed = record["predicate"].get("sealed_changes")
    if unseal is None or not isinstance(sealed, str):
        return record
    inner = unseal(sealed)
    full = copy.deepcopy(record)
    predicate = full["predicate"]
    predicate["affected"]["adapters"] = inner["adapters"]
    predicate["artifacts"] = {**predicate["artifacts"], **inner["artifacts"]}
    predicate["quality"]["failed_expectations"] = inner["failed_expectations"]
    for evidence in ("adapter_proofs", "adapter_files"):  # the proofs, or every file's digest (``_root_evidence``)
        if evidence in inner:
            predicate[f"opened_{evidence}"] = inner[evidence]
    return full


def root_problems(record: dict[str, Any]) -> list[str]:
    """An opened record's sealed adapter digests must be those its published Merkle roots commit to: otherwise
    the sealed changes are not what was published."""
    predicate = record["predicate"]
    if "opened_adapter_proofs" in predicate:
        return _update_problems(predicate)
    files = predicate.get("opened_adapter_files")
    if files is None:
        return []
    before = {**files, **{p: c["before"] for p, c in predicate["artifacts"].items() if names_adapter(p)}}
    return [f"request {predicate['request_id']}: sealed adapter digests do not give the published {when} root"
            for when, digests in (("before", before), ("after", files))
            if adapter_root(digests) != predicate["adapter_files"][when]]


def _update_problems(predicate: dict[str, Any]) -> list[str]:
    """Each changed adapter file's sealed before digest must be its leaf in the published before root (its sealed
    audit path shows it), and those leaves replaced by the sealed after digests must give the published after
    root, which shows that every other adapter file kept its digest."""
    request, roots, proofs = predicate["request_id"], predicate["adapter_files"], predicate["opened_adapter_proofs"]
    changed = {p: c for p, c in predicate["artifacts"].items() if names_adapter(p)}
    if sorted(proofs) != sorted(changed):
        return [f"request {request}: the sealed proofs name {len(proofs)} adapter file(s), the sealed changes "
                f"{len(changed)} other ones"]
    try:
        size, before = roots["files"], bytes.fromhex(roots["before"])
        entries = {p: (proofs[p]["index"], _leaf(p, c["before"]), _leaf(p, c["after"]),
                       [bytes.fromhex(node) for node in proofs[p]["proof"]]) for p, c in sorted(changed.items())}
        wrong = [p for p, (index, old, _, path) in entries.items()
                 if not verify_inclusion(index, size, old, path, before)]
        if wrong:
            return [f"request {request}: {p}: the sealed proof does not show its sealed before digest in the adapter "
                    "files' published before root" for p in wrong]
        updates = {index: (old, new, path) for index, old, new, path in entries.values()}
        if updated_root(size, before, updates) != bytes.fromhex(roots["after"]):
            return [f"request {request}: the sealed after digests of the changed adapter files do not give the "
                    "published after root: another adapter file changed, or a sealed digest is wrong"]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"request {request}: malformed sealed proof or published root ({type(exc).__name__}: {exc})"]
    return []


def subjects(files: Mapping[str, str]) -> dict[str, str]:
    """In-toto subjects (path -> sha256): the adapter files folded into one Merkle root, so that two records'
    subjects do not show which adapters changed between them."""
    kept = {p: d for p, d in files.items() if not names_adapter(p)}
    return {**kept, SUBJECT: adapter_root(files)}
