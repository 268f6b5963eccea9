"""RFC 6962 Merkle proofs and C2SP signed notes against published test vectors (no project needed)."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pipeline.audit.transparency import (
    Checkpoint,
    consistency_proof,
    inclusion_proof,
    inclusion_proofs,
    leaf_hash,
    open_note,
    root_hash,
    sign_note,
    updated_root,
    verifier_key,
    verify_consistency,
    verify_inclusion,
)
from pipeline.errors import TransparencyError

VECTORS = Path(__file__).parent / "data" / "rfc6962"
# transparency-dev/merkle testonly/constants.go: leaf inputs and the root of every prefix of them
LEAVES = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
ROOTS = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
         "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
# golang.org/x/mod/sumdb/note: the documented example note, its signer and verifier keys
GO_SIGNER = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VERIFIER = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = GO_TEXT + ("\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngot"
                     "pRZb6KE6RyyBwJnAM=\n")


def hashes() -> list[bytes]:
    return [leaf_hash(bytes.fromhex(leaf)) for leaf in LEAVES]


def cases(kind: str) -> list[dict]:
    return json.loads((VECTORS / f"{kind}.json").read_text())["cases"]


def b64(value: str | None) -> bytes:
    return base64.b64decode(value or "")


def proof_of(case: dict) -> list[bytes]:
    return [b64(p) for p in case.get("proof") or []]


def test_root_of_every_prefix_matches_the_published_roots() -> None:
    assert [root_hash(hashes()[:n]).hex() for n in range(len(LEAVES) + 1)] == ROOTS


@pytest.mark.parametrize("case", cases("inclusion"), ids=lambda c: c["file"].removeprefix("testdata/"))
def test_inclusion_vectors(case: dict) -> None:
    ok = verify_inclusion(case["leafIdx"], case["treeSize"], b64(case["leafHash"]), proof_of(case), b64(case["root"]))
    assert ok is not case["wantErr"]


@pytest.mark.parametrize("case", cases("consistency"), ids=lambda c: c["file"].removeprefix("testdata/"))
def test_consistency_vectors(case: dict) -> None:
    ok = verify_consistency(case["size1"], case["size2"], b64(case["root1"]), b64(case["root2"]), proof_of(case))
    assert ok is not case["wantErr"]


def test_generated_proofs_verify_and_reproduce_the_published_ones() -> None:
    leaves = hashes()
    for size in range(1, len(leaves) + 1):
        root = bytes.fromhex(ROOTS[size])
        for index in range(size):
            proof = inclusion_proof(leaves[:size], index)
            assert verify_inclusion(index, size, leaves[index], proof, root)
            assert not verify_inclusion(index, size, leaves[(index + 1) % len(leaves)], proof, root) or size == 1
        for old in range(1, size + 1):
            proof = consistency_proof(leaves[:size], old)
            assert verify_consistency(old, size, bytes.fromhex(ROOTS[old]), root, proof)
            if old < size:
                assert not verify_consistency(old, size, bytes.fromhex(ROOTS[old - 1 or 2]), root, proof)
    for case in cases("inclusion") + cases("consistency"):  # our proofs equal the published happy paths
        if not case["wantErr"] and "leafIdx" in case and case["treeSize"] <= len(leaves) and case["proof"]:
            assert inclusion_proof(leaves[:case["treeSize"]], case["leafIdx"]) == proof_of(case)
        if not case["wantErr"] and "size1" in case and case["size2"] <= len(leaves) and case["proof"]:
            assert consistency_proof(leaves[:case["size2"]], case["size1"]) == proof_of(case)


def go_key() -> Ed25519PrivateKey:
    seed = base64.b64decode(GO_SIGNER.split("+", 4)[4])
    assert seed[0] == 1
    return Ed25519PrivateKey.from_private_bytes(seed[1:])


def test_signed_note_reproduces_the_go_note_package_byte_for_byte() -> None:
    key = go_key()
    assert verifier_key("PeterNeumann", key.public_key()) == GO_VERIFIER
    assert sign_note(GO_TEXT, "PeterNeumann", key) == GO_NOTE
    assert open_note(GO_NOTE, "PeterNeumann", key.public_key()) == GO_TEXT
    with pytest.raises(TransparencyError, match="changed after signing"):
        open_note(GO_NOTE.replace("cryptography", "cryptographY"), "PeterNeumann", key.public_key())
    with pytest.raises(TransparencyError, match="no signature by"):
        open_note(GO_NOTE, "PeterNeumann", Ed25519PrivateKey.generate().public_key())


def test_checkpoint_round_trip_and_refusals() -> None:
    key = Ed25519PrivateKey.generate()
    checkpoint = Checkpoint("legonet.local/audit/abc", 8, bytes.fromhex(ROOTS[8]))
    note = checkpoint.sign(key)
    assert note.startswith("legonet.local/audit/abc\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n\n\u2014 ")
    assert Checkpoint.open(note, key.public_key()) == checkpoint
    with pytest.raises(TransparencyError, match="changed after signing"):
        Checkpoint.open(note.replace("\n8\n", "\n7\n"), key.public_key())
    for bad in ("x\n08\nAA==\n", "x\n1\nAA==\n", "x\n1\n"):
        with pytest.raises(TransparencyError, match="checkpoint"):
            Checkpoint.parse(bad)


# --- the root of a tree with a few leaves replaced, from their audit paths ---


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 13, 32, 33])
def test_the_audit_paths_of_replaced_leaves_give_the_new_root(size: int) -> None:
    """One, several and every leaf replaced, at sizes on and off a power of two: the old tree's audit paths of
    the replaced leaves and their new values give the new tree's root."""
    rng = random.Random(size)
    old = [leaf_hash(f"old {i}".encode()) for i in range(size)]
    for changed in [[0], [size - 1], sorted(rng.sample(range(size), min(3, size))), list(range(size))]:
        new = [leaf_hash(f"new {i}".encode()) if i in changed else leaf for i, leaf in enumerate(old)]
        paths = inclusion_proofs(old, changed)
        assert paths == [inclusion_proof(old, i) for i in changed]
        updates = {i: (old[i], new[i], path) for i, path in zip(changed, paths, strict=True)}
        assert updated_root(size, root_hash(old), updates) == root_hash(new)
    assert updated_root(size, root_hash(old), {}) == root_hash(old)


def test_a_replaced_leaf_not_in_the_old_tree_or_one_more_change_is_caught() -> None:
    old = [leaf_hash(bytes([i])) for i in range(13)]
    new = [leaf_hash(b"x") if i in (2, 9) else leaf for i, leaf in enumerate(old)]
    two, nine = inclusion_proofs(old, [2, 9])
    assert updated_root(13, root_hash(old), {2: (old[2], new[2], two), 9: (old[9], new[9], nine)}) == root_hash(new)
    assert updated_root(13, root_hash(old), {2: (leaf_hash(b"y"), new[2], two), 9: (old[9], new[9], nine)}) is None
    assert updated_root(13, root_hash(old), {2: (old[2], new[2], nine)}) is None  # another leaf's path
    assert updated_root(4, root_hash(old), {2: (old[2], new[2], two)}) is None  # a tree of another shape
    # leaf 5 changed too, but no update names it: the new root is not the one the replaced leaves give
    also = [leaf_hash(b"y") if i == 5 else leaf for i, leaf in enumerate(new)]
    assert updated_root(13, root_hash(old), {2: (old[2], new[2], two), 9: (old[9], new[9], nine)}) != root_hash(also)
    with pytest.raises(TransparencyError, match="leaf 13 is not in a tree of 13 leaves"):
        inclusion_proofs(old, [2, 13])
