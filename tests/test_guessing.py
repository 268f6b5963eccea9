"""The guessing attack (docs/audit.md, "What each published value reveals, and to whom"): someone who holds the
data as it was before a forget (here: the table the project was built from, its encoded rows and routing, all
recomputable from public data and code), the project's git history (every commit's files and diffs), the audit
record and the receipt, but not the key dir, tries every training sample as the forgotten one against every
published value. With the data salt, no md5 matches any candidate, the file sizes leave a window that holds many,
and what remains (the partition, the train blocks dvc.lock shows as changed) leaves more than one candidate, the
forgotten sample among them. The control runs the same attack on an unsalted write of the same rows (what the
code before the salt published): it finds exactly the forgotten sample.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import copy_project, legonet
from test_forget import write_manifest

from pipeline.audit.envelope import parse_envelope, parse_statement
from pipeline.data.dataset import (
    SplitFractions,
    carve,
    check_samples,
    read_embeddings,
    read_metadata,
    read_table,
    write_embeddings,
    write_table,
)
from pipeline.data.salt import PAD, SALT_KEY, secret_path
from pipeline.project.layout import block_of

_MD5 = re.compile(r"\b[0-9a-f]{32}\b")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def md5_size(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.md5(data).hexdigest(), len(data)


@pytest.fixture(scope="module")
def forgotten(built_project: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the built default project that forgot one train sample, and what an attacker holds beforehand."""
    work = tmp_path_factory.mktemp("guessing")
    root = copy_project(built_project, work / "project")
    encoded = sorted((root / "data/encoded/train").glob("*.parquet"))
    before = {"encoded": {p.name: read_embeddings(p, digests=True) for p in encoded},
              "routing": read_table(root / "data/routing.parquet")}
    victim = sorted(before["routing"]["sample_id"])[len(before["routing"]) // 3]
    legonet("forget", str(write_manifest(work / "m.json", "req-guess", [victim])), cwd=root)
    receipt = json.loads(legonet("audit", "receipt", "req-guess", cwd=root).stdout)
    outside = work / "attacker"  # outside any project: the writer salts nothing there, as code without salt did
    outside.mkdir()
    return {"root": root, "victim": victim, "before": before, "receipt": receipt, "outside": outside,
            "data": pd.read_parquet(tiny_data)}


def published(root: Path, receipt: dict[str, Any]) -> dict[str, Any]:
    """What the attacker reads without the key dir: every commit's .dvc files and dvc.lock, `git log -p`, every
    file in git now, the record, the receipt."""
    log = git(root, "log", "-p", "--all")
    records = [git(root, "show", f"HEAD:{path}") for path in git(root, "ls-tree", "-r", "--name-only", "HEAD",
                                                                   "audit/records").split()]
    # a record is a DSSE envelope: its statement is base64 inside, so it is read decoded
    statements = [json.dumps(parse_statement(parse_envelope(r.encode())[1])) for r in [receipt["record"], *records]]
    head, parent = ({path: yaml.safe_load(git(root, "show", f"{rev}:{path}"))
                     for path in git(root, "ls-tree", "-r", "--name-only", rev).split()
                     if path.endswith((".dvc", "dvc.lock"))} for rev in ("HEAD", "HEAD~1"))
    metrics = git(root, "ls-tree", "-r", "--name-only", "HEAD", "metrics").split()
    text = "\n".join([log, json.dumps(receipt), *statements, git(root, "grep", "-h", "-I", "-e", ".", "HEAD")])
    return {"log": log, "statements": statements, "head": head, "parent": parent, "metrics": metrics,
            "md5s": set(_MD5.findall(text))}


def outputs(lock: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["path"]: o for stage in lock["stages"].values() for o in stage.get("outs", [])}


def changed_partition(view: dict[str, Any]) -> str:
    """The raw partition whose .dvc file the forget's commit changed (public, by design: docs/audit.md)."""
    (part,) = [p for p in view["head"] if p.startswith("data/raw/") and view["head"][p] != view["parent"][p]]
    return part.removeprefix("data/raw/").removesuffix(".parquet.dvc")


def attack(view: dict[str, Any], rows: dict[str, Any], outside: Path, write: Any,
           kinds: tuple[str, ...] = ("raw", "encoded", "routing")) -> dict[str, set[str]]:
    """Each published value's consistent candidates. ``rows``: the attacker's pre-forget tables of the changed
    partition; ``write(kind, frame, path)`` writes a candidate's table as the project's writer would (unsalted: the
    attacker has no secret)."""
    lock_now, lock_then = outputs(view["head"]["dvc.lock"]), outputs(view["parent"]["dvc.lock"])
    part = changed_partition(view)
    raw_now = view["head"][f"data/raw/{part}.parquet.dvc"]["outs"][0]
    encoded = f"data/encoded/train/{part}.parquet"
    targets = {"raw": (raw_now["md5"], raw_now["size"]),
               "encoded": (lock_now[encoded]["md5"], lock_now[encoded]["size"]),
               "routing": (lock_now["data/routing.parquet"]["md5"], lock_now["data/routing.parquet"]["size"])}
    targets = {kind: targets[kind] for kind in kinds}
    blocks = {o for o in lock_now if o.startswith("models/adapters/block-") and lock_now[o] != lock_then[o]}
    found: dict[str, set[str]] = {f"{kind} {what}": set() for kind in targets for what in ("md5", "size")}
    found["changed train blocks"] = set()
    candidates = sorted(rows["raw"]["sample_id"])
    for sample in candidates:
        for kind, (md5, size) in targets.items():
            frame = rows[kind]
            path = outside / f"{kind}.parquet"
            kept = frame[frame["sample_id"] != sample]
            write(kind, kept, path)
            got_md5 = md5_size(path)[0]
            found[f"{kind} md5"] |= {sample} if got_md5 in view["md5s"] or got_md5 == md5 else set()
            # the sizes a salted write of these rows can have: the smallest pad and the largest
            smallest, largest = (salted_size(write, kind, kept, path, salt) for salt in (FEWEST, MOST))
            found[f"{kind} size"] |= {sample} if smallest <= size <= largest else set()
        mine = {f"models/adapters/block-{block_of(int(j), rows['n'], rows['blocks']):04d}"
                for j in rows["adapters"][sample]}
        found["changed train blocks"] |= {sample} if mine == blocks else set()
    found["candidates"] = set(candidates)
    return found


# salts (64 hex digits) whose pads are the shortest and the longest the writer adds (pipeline.data.salt.padded)
FEWEST, MOST = "0" * 64, f"{PAD - 1:08x}" + "0" * 56


def with_salt(write: Any, kind: str, frame: pd.DataFrame, path: Path, salt: str) -> Path:
    """``frame`` written at ``path`` by ``write`` (the project's own writer) with ``salt`` as its salt: an attacker
    can try any salt, not compute the project's."""
    with patch("pipeline.data.dataset.salt_of", return_value=salt):
        write(kind, frame, path)
    return path


def salted_size(write: Any, kind: str, frame: pd.DataFrame, path: Path, salt: str) -> int:
    return with_salt(write, kind, frame, path, salt).stat().st_size


def project_salt(path: Path) -> str:
    """The salt a project's table carries (without its pad): what only the data secret's holder can compute."""
    return pq.read_schema(path).metadata[SALT_KEY.encode()].decode().rstrip(" ")


def attacker_rows(forgotten: dict[str, Any], view: dict[str, Any]) -> dict[str, Any]:
    """The pre-forget rows of the partition the .dvc files show as changed, as the attacker recomputes them: the
    carve of the original table by params (in git), the encoder's rows and the routing (public code and keys)."""
    params = yaml.safe_load(git(forgotten["root"], "show", "HEAD:params.yaml"))
    data = params["data"]
    frame = check_samples(forgotten["data"], "original", data["modality"], data["classes"], data["image_shape"])
    parts = carve(frame, SplitFractions(data["reference_fraction"], data["test_fraction"]), int(data["partitions"]))
    name = changed_partition(view)
    frame, embeddings = forgotten["before"]["encoded"][f"{name}.parquet"]
    routing = forgotten["before"]["routing"]
    return {"raw": parts[name], "encoded": frame.assign(embedding=list(embeddings)), "routing": routing,
            "adapters": dict(zip(routing["sample_id"], routing["adapters"], strict=True)),
            "n": int(params["adapters"]["n"]), "blocks": int(params["adapters"]["blocks"]),
            "routing_metadata": read_metadata(forgotten["root"] / "data/routing.parquet"),
            # the encoder's settings the stage stores in each encoded table (public: params, code, weights)
            "encoded_metadata": read_metadata(forgotten["root"] / f"data/encoded/train/{name}.parquet")}


def writer(rows: dict[str, Any]) -> Any:
    def write(kind: str, frame: pd.DataFrame, path: Path) -> None:
        if kind == "encoded":
            write_embeddings(path, frame.drop(columns="embedding"), pd.DataFrame(frame["embedding"].tolist())
                             .to_numpy("float32"), metadata=rows["encoded_metadata"])
        else:
            write_table(frame, path, metadata=rows["routing_metadata"] if kind == "routing" else None)
    return write


def test_no_published_value_singles_out_the_forgotten_sample(forgotten: dict[str, Any]) -> None:
    root, victim = forgotten["root"], forgotten["victim"]
    view = published(root, forgotten["receipt"])
    rows = attacker_rows(forgotten, view)
    found = attack(view, rows, forgotten["outside"], writer(rows))
    candidates = found.pop("candidates")
    assert victim in candidates and len(candidates) > 100
    # the attacker's writer is the project's: the victim's removal, given the project's own salt, is each table
    # byte for byte (so the size windows above hold the victim whatever pad the secret drew)
    part = changed_partition(view)
    for kind, name in (("raw", f"data/raw/{part}.parquet"), ("encoded", f"data/encoded/train/{part}.parquet"),
                       ("routing", "data/routing.parquet")):
        kept, path = rows[kind][rows[kind]["sample_id"] != victim], forgotten["outside"] / f"{kind}.parquet"
        assert md5_size(root / name) == md5_size(with_salt(writer(rows), kind, kept, path, project_salt(root / name)))
    # no digest of any candidate's table is anywhere in git, the record or the receipt
    assert not found["raw md5"] and not found["encoded md5"] and not found["routing md5"], found
    consistent = set(candidates)
    for value, matching in found.items():
        if not value.endswith("md5"):
            assert victim in matching, value
            consistent &= matching
    counts = {k: len(v) for k, v in found.items()}
    print(f"candidates consistent with everything published: {len(consistent)} of {len(candidates)}; {counts}")
    assert victim in consistent and len(consistent) > 1, counts
    # nothing in git counts per adapter, and the record names no adapter
    assert view["metrics"] and not [m for m in view["metrics"] if "adapter" in m], view["metrics"]
    assert "adapter_load" not in view["log"].replace("reports/evaluate/adapter_load.csv", "")
    assert "metrics/adapter_load.csv" not in view["log"]
    for statement in view["statements"]:
        assert '"untouched_adapters"' not in statement and victim not in statement
        assert not re.search(r"adapter-\d{4}", statement), "a record names an adapter file"
        assert "adapters" not in json.loads(statement)["predicate"]["affected"]
    assert secret_path(root).is_file()  # the attack above ran without it


def test_the_control_attack_on_an_unsalted_write_finds_exactly_the_forgotten_sample(forgotten: dict[str, Any]
                                                                                    ) -> None:
    """The same attack, the published md5 being what the code before the salt published (an unsalted write of the
    retained rows): one match, the forgotten sample. So the attack above can fail."""
    root, victim = forgotten["root"], forgotten["victim"]
    view = published(root, forgotten["receipt"])
    rows = attacker_rows(forgotten, view)
    raw = f"data/raw/{changed_partition(view)}.parquet"
    unsalted = forgotten["outside"] / "unsalted.parquet"
    write_table(read_table(root / raw), unsalted)
    md5, size = md5_size(unsalted)
    view["head"][f"{raw}.dvc"]["outs"][0].update(md5=md5, size=size)
    view["md5s"] = {md5}
    found = attack(view, rows, forgotten["outside"], writer(rows), kinds=("raw",))
    assert found["raw md5"] == {victim}
    # without the keyed pad, the size alone: the candidates whose removal gives exactly this many bytes
    same_size = set()
    for sample in sorted(rows["raw"]["sample_id"]):
        write_table(rows["raw"][rows["raw"]["sample_id"] != sample], unsalted)
        same_size |= {sample} if unsalted.stat().st_size == size else set()
    print(f"unsalted size alone leaves {len(same_size)} of {len(rows['raw'])} candidates")
    assert victim in same_size


def test_a_forget_without_the_data_secret_refuses_before_any_change(built_project: Path, tmp_path: Path) -> None:
    """A lost data secret is an error naming the fix, never a new secret (which would change every digest)."""
    root = copy_project(built_project, tmp_path / "project")
    secret = secret_path(root)
    secret.rename(tmp_path / "kept.secret")
    sample = sorted(read_table(root / "data/routing.parquet")["sample_id"])[0]
    before = git(root, "status", "--porcelain")
    result = legonet("forget", str(write_manifest(tmp_path / "m.json", "req-lost", [sample])), cwd=root, check=False)
    assert result.returncode == 9, result.stderr
    assert "data secret is missing" in result.stderr and "restore the key dir" in result.stderr, result.stderr
    assert not secret.exists() and git(root, "status", "--porcelain") == before
    assert not (root / ".legonet/journal.json").exists()
