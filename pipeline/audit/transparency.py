"""An append-only log's head, anchored outside it: RFC 6962 Merkle trees and C2SP signed-note checkpoints.

The audit records are the leaves of an RFC 6962 Merkle tree (leaf hash ``SHA-256(0x00 || record bytes)``, node
hash ``SHA-256(0x01 || left || right)``). A *checkpoint* (C2SP tlog-checkpoint) states the tree's size and root;
it is a signed note (C2SP signed-note, Ed25519): anyone who kept one can later ask for a consistency proof that
today's tree extends it, so dropping, rewriting or reordering any record that existed when the checkpoint was
published is caught, even by a verifier who trusts nothing the operator stores. An inclusion proof shows that one
record is a leaf of a checkpointed tree (the data subject's receipt).
The audit paths of a few leaves of a tree also give the root of that tree with those leaves replaced
(``updated_root``): the new root, if it is the one published, shows that no other leaf changed, in O(changed x
log n) (the adapter files of an audit record, pipeline.audit.disclosure).

The proof algorithms are RFC 6962 section 2.1 (generation) and RFC 9162 section 2.1.3.2 / 2.1.4.2
(verification); ``tests/test_transparency.py`` checks them against transparency-dev/merkle's test vectors.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipeline.errors import TransparencyError

HASH_SIZE = 32
_ED25519 = b"\x01"  # signed-note signature type of Ed25519 keys
_SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space start each signature line


# --- RFC 6962 hashing and proofs ---


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1): where RFC 6962 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes; the empty tree's root is SHA-256 of nothing."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    return _subtrees(leaves, 0, {})


def _subtrees(leaves: Sequence[bytes], first: int, into: dict[tuple[int, int], bytes]) -> bytes:
    """MTH of ``leaves`` (non-empty; leaves ``first``.. of a larger tree), keeping every node's hash in ``into`` by
    the range of leaves it covers (first, end)."""
    if len(leaves) == 1:
        digest = leaves[0]
    else:
        k = _split(len(leaves))
        digest = _node(_subtrees(leaves[:k], first, into), _subtrees(leaves[k:], first + k, into))
    into[first, first + len(leaves)] = digest
    return digest


def _path_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges (first, end) of the subtrees on leaf ``index``'s audit path, bottom-up (PATH's order)."""
    first, end, ranges = 0, size, []
    while end - first > 1:
        middle = first + _split(end - first)
        ranges.append((middle, end) if index < middle else (first, middle))
        first, end = (first, middle) if index < middle else (middle, end)
    return ranges[::-1]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]): the audit path from leaf ``index`` to the root."""
    return inclusion_proofs(leaves, [index])[0]


def inclusion_proofs(leaves: Sequence[bytes], indices: Sequence[int]) -> list[list[bytes]]:
    """The audit paths of several leaves, hashing the tree once."""
    for index in indices:
        if not 0 <= index < len(leaves):
            raise TransparencyError(f"leaf {index} is not in a tree of {len(leaves)} leaves")
    nodes: dict[tuple[int, int], bytes] = {}
    if indices:
        _subtrees(leaves, 0, nodes)
    return [[nodes[r] for r in _path_ranges(index, len(leaves))] for index in indices]


def updated_root(size: int, root: bytes, updates: Mapping[int, tuple[bytes, bytes, Sequence[bytes]]]) -> bytes | None:
    """The root of the tree (``size``, ``root``) with some leaves replaced, every other leaf kept: ``updates`` maps
    each replaced leaf's index to its old leaf hash, its new one and its audit path in the old tree. None if a path
    does not show its old leaf under ``root``. O(replaced x log n): the untouched subtrees' hashes are the paths'."""
    known = {(0, size): root}
    for index, (old, _, proof) in updates.items():
        if not verify_inclusion(index, size, old, proof, root):
            return None
        known.update(zip(_path_ranges(index, size), proof, strict=True))
    replaced = sorted(updates)

    def subtree(first: int, end: int) -> bytes:
        if bisect.bisect_left(replaced, first) == bisect.bisect_left(replaced, end):
            return known[first, end]  # no leaf replaced below: a sibling on some replaced leaf's path, or the root
        if end - first == 1:
            return updates[first][1]
        middle = first + _split(end - first)
        return _node(subtree(first, middle), subtree(middle, end))

    return subtree(0, size)


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]): proves the first ``old_size`` leaves form a prefix of ``leaves``."""
    if not 0 < old_size <= len(leaves):
        raise TransparencyError(f"no consistency proof from size {old_size} to size {len(leaves)}")
    return _subproof(leaves, old_size, True)


def _subproof(leaves: Sequence[bytes], m: int, complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [root_hash(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(leaves[:k], m, complete), root_hash(leaves[k:])]
    return [*_subproof(leaves[k:], m - k, False), root_hash(leaves[:k])]


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 2.1.3.2: does ``proof`` show ``leaf`` at ``index`` in the tree of ``size`` with ``root``?"""
    if not 0 <= index < size or len(leaf) != HASH_SIZE or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: does ``proof`` show the tree (new_size, new_root) extends (old_size, old_root)?

    As in transparency-dev/merkle, a proof from the empty tree is refused (it proves nothing; callers treat a
    size-0 checkpoint as trivially extended).
    """
    if not 0 < old_size <= new_size or any(len(p) != HASH_SIZE for p in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = _node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == old_root and sr == new_root and sn == 0


# --- C2SP signed notes and checkpoints ---


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def note_key_hash(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte key hash that starts a signed-note signature: SHA-256(name || LF || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + _ED25519 + _raw(public_key)).digest()[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The note verifier key string ``<name>+<hex key hash>+<base64(0x01 || key)>`` (as Go's ``note`` prints)."""
    return (f"{name}+{note_key_hash(name, public_key).hex()}+"
            f"{base64.b64encode(_ED25519 + _raw(public_key)).decode('ascii')}")


def sign_note(text: str, name: str, key: Ed25519PrivateKey) -> str:
    """A signed note: ``text`` (ending in a newline), a blank line, one Ed25519 signature line by ``name``."""
    if not text.endswith("\n") or "\n\n" in text:
        raise TransparencyError("note text must end with a newline and hold no blank line")
    if not name or any(c.isspace() or c == "+" for c in name):
        raise TransparencyError(f"note key name {name!r} must be non-empty, without spaces or '+'")
    blob = note_key_hash(name, key.public_key()) + key.sign(text.encode("utf-8"))
    return f"{text}\n{_SIGNATURE_PREFIX}{name} {base64.b64encode(blob).decode('ascii')}\n"


def open_note(note: str, name: str, public_key: Ed25519PublicKey) -> str:
    """The text of ``note`` if it carries a valid signature by (``name``, ``public_key``); else raise."""
    if not note.endswith("\n"):
        raise TransparencyError("not a signed note: every signature line ends with a newline, the last one too")
    text, sep, signatures = note.rpartition("\n\n")
    if not sep or not text:
        raise TransparencyError("not a signed note: no blank line between text and signatures")
    text += "\n"
    wanted = note_key_hash(name, public_key)
    verified = False
    for line in signatures.splitlines():
        if not line.startswith(_SIGNATURE_PREFIX) or line.count(" ") != 2:
            raise TransparencyError(f"malformed signature line {line[:60]!r}")
        signer, encoded = line[len(_SIGNATURE_PREFIX):].split(" ")
        try:
            blob = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise TransparencyError(f"signature by {signer!r} is not base64") from exc
        if signer != name or blob[:4] != wanted:
            continue  # another witness's signature: not the one asked for
        try:  # every line by this key must verify: a good one does not excuse a bad one beside it
            public_key.verify(blob[4:], text.encode("utf-8"))
        except InvalidSignature as exc:
            raise TransparencyError(f"bad signature by {name!r}: the note was changed after signing") from exc
        verified = True
    if not verified:
        raise TransparencyError(f"the note carries no signature by {name!r} with key hash {wanted.hex()}")
    return text


@dataclass(frozen=True)
class Checkpoint:
    """A tlog checkpoint body: the log's origin (its name), its size and its root hash."""

    origin: str
    size: int
    root: bytes

    def text(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode('ascii')}\n"

    def sign(self, key: Ed25519PrivateKey) -> str:
        """The signed note; the key name is the origin, as C2SP checkpoints usually do."""
        return sign_note(self.text(), self.origin, key)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise TransparencyError("a checkpoint has an origin, a tree size and a root hash line")
        origin, size, root = lines[:3]
        try:
            if not size.isdigit() or (size != "0" and size.startswith("0")):
                raise ValueError(f"tree size {size!r} is not a decimal number")
            digest = base64.b64decode(root, validate=True)
            if len(digest) != HASH_SIZE:
                raise ValueError(f"root hash is {len(digest)} bytes, not {HASH_SIZE}")
        except (ValueError, binascii.Error) as exc:
            raise TransparencyError(f"malformed checkpoint: {exc}") from exc
        return cls(origin, int(size), digest)

    @classmethod
    def open(cls, note: str, public_key: Ed25519PublicKey) -> Checkpoint:
        """The checkpoint in a signed note, after checking its signature by ``public_key`` under its origin."""
        origin = note.split("\n", 1)[0]
        return cls.parse(open_note(note, origin, public_key))
