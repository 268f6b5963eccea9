"""Code in the lineage (pipeline/project/code.py): a change of legonet's source or of a library version reruns
exactly the stages whose bytes it decides, and nothing built by other code is reused.

The code under test runs from a private copy of legonet's source (``PYTHONPATH``), so a test can edit it like a
developer would without touching the checkout other tests import.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import copy_project, legonet

import pipeline
from pipeline.data.dataset import read_table
from pipeline.tracking import digeststore, lineage

RUNNING = re.compile(r"^Running stage '([^']+)':", re.MULTILINE)
SOURCE = Path(pipeline.__file__).resolve().parents[1]  # the folder holding `pipeline` and `stages`
TRAIN_STAGES = {"train@0000", "train@0001"}


def code_copy(dst: Path) -> dict[str, str]:
    """A copy of legonet's source at ``dst``; the environment that runs it (CLI, DVC's stage commands)."""
    for package in ("pipeline", "stages"):
        shutil.copytree(SOURCE / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    return {"PYTHONPATH": str(dst)}


def run(*args: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def python(code: str, cwd: Path, env: dict[str, str]) -> str:
    return run(sys.executable, "-c", code, cwd=cwd, env=env).stdout


def sync(root: Path, env: dict[str, str]) -> bool:
    """What `legonet build` does first: regenerate `code` in params.yaml; whether it changed."""
    return python("from pathlib import Path; from pipeline.project.code import sync_code; "
                  "print(sync_code(Path()))", root, env).strip() == "True"


def stale(root: Path, env: dict[str, str]) -> set[str]:
    """The stages `dvc status` reports as changed."""
    return set(json.loads(run(sys.executable, "-m", "dvc", "status", "--json", cwd=root, env=env).stdout or "{}"))


def repro(root: Path, env: dict[str, str]) -> tuple[set[str], str]:
    output = run(sys.executable, "-m", "dvc", "repro", cwd=root, env=env).stdout
    return set(RUNNING.findall(output)), output


def files(root: Path, *tops: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for top in tops for p in sorted((root / top).rglob("*"))
            if p.is_file()}


def test_code_entries_follow_the_code_each_stage_runs(tmp_path: Path) -> None:
    """The entries do not depend on where the code is installed; a comment in the adapters' module changes the
    entries of the stages that call it (train, evaluate) and of the package (which ships the source), not encode's;
    the libraries are those each stage's code calls."""
    shutil.copy(SOURCE / "dvc.yaml", tmp_path / "dvc.yaml")
    show = "from pathlib import Path; import json; from pipeline.project.code import code_params; " \
           "print(json.dumps(code_params(Path())))"
    here = json.loads(python(show, tmp_path, {"PYTHONPATH": str(SOURCE)}))
    env = code_copy(tmp_path / "code")
    assert json.loads(python(show, tmp_path, env)) == here  # same source bytes elsewhere: same entries
    assert set(here) == {"encoder", "encode", "keys", "assign", "train", "quality", "baseline", "evaluate",
                         "package", "embedding"}
    assert {"onnxruntime", "numpy"} <= set(here["embedding"]) and "pyarrow" not in here["embedding"]
    assert "onnxruntime" in here["encode"] and "torch" not in here["encode"]
    assert {"torch", "safetensors"} <= set(here["train"]) and "onnxruntime" not in here["train"]
    assert {"torch", "onnx", "protobuf"} <= set(here["encoder"])
    assert "great-expectations" in here["quality"] and "great-expectations" not in here["train"]
    assert {"mlflow", "cloudpickle"} <= set(here["package"])
    assert not {"rich", "ray"} & {library for entry in here.values() for library in entry}
    adapters = tmp_path / "code/pipeline/model/adapters.py"
    adapters.write_text(adapters.read_text() + "# a comment\n")
    after = json.loads(python(show, tmp_path, env))
    assert {stage for stage in here if after[stage] != here[stage]} == {"train", "evaluate", "package"}
    assert all(after[stage]["legonet"] != here[stage]["legonet"] for stage in ("train", "evaluate", "package"))

    # the embedding entry follows the definitions that compute an embedding, not their files: a comment in the
    # dataset module, or a change to how a table is written, reruns `encode` but keeps the rows it encoded
    dataset = tmp_path / "code/pipeline/data/dataset.py"
    text = dataset.read_text()
    dataset.write_text(text + "# a comment\n")
    commented = json.loads(python(show, tmp_path, env))
    assert commented["encode"] != after["encode"] and commented["embedding"] == here["embedding"]
    writer = '    """Write ``sample_id``, ``label`` (and any'  # write_embeddings' docstring: in its syntax tree
    assert text.count(writer) == 1
    dataset.write_text(text.replace(writer, writer.replace("Write", "Write (another way)")))
    rewritten = json.loads(python(show, tmp_path, env))
    assert rewritten["encode"] != after["encode"] and rewritten["embedding"] == here["embedding"]
    reader = '    """What the encoder reads from a validated sample table'  # encoder_inputs' docstring
    assert text.count(reader) == 1
    dataset.write_text(text.replace(reader, reader.replace("reads", "reads (another way)")))
    assert json.loads(python(show, tmp_path, env))["embedding"]["legonet"] != here["embedding"]["legonet"]


@pytest.fixture()
def project(built_project: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the built tiny project, and the environment of a copy of the code that built it."""
    root = copy_project(built_project, tmp_path / "p")
    env = code_copy(tmp_path / "code")
    before = (root / "params.yaml").read_bytes()
    assert not sync(root, env) and (root / "params.yaml").read_bytes() == before  # byte-stable, path-free
    assert stale(root, env) == set()
    return root, env


def test_a_comment_in_a_stage_reruns_it_and_its_dependants_only(project: tuple[Path, dict[str, str]],
                                                                tmp_path: Path) -> None:
    root, env = project
    train = tmp_path / "code/stages/train.py"
    train.write_text(train.read_text() + "# a comment changes no behaviour, but it is other code\n")

    # before the entries are regenerated, DVC cannot see the change, and a stage that runs refuses
    assert stale(root, env) == set()
    forced = run(sys.executable, "-m", "dvc", "repro", "-f", "train@0000", cwd=root, env=env, check=False)
    assert forced.returncode != 0 and "code.train" in forced.stderr + forced.stdout
    assert "legonet build" in forced.stderr + forced.stdout
    sample = read_table(root / "data/routing.parquet")["sample_id"].iloc[0]
    manifest = tmp_path / "request.json"
    manifest.write_text(json.dumps({"request_id": "r-1", "sample_ids": [sample], "reason": "test",
                                    "received_at": "2024-05-01T09:30:00Z"}))
    raw = files(root, "data/raw")
    refused = legonet("forget", str(manifest), cwd=root, env=env, check=False)
    assert refused.returncode == 4 and "code.train" in refused.stderr, refused.stderr
    assert files(root, "data/raw") == raw  # refused before a row was touched

    encoded, adapters = files(root, "data/encoded"), files(root, "models/adapters")
    assert sync(root, env)
    assert stale(root, env) == TRAIN_STAGES
    ran, log = repro(root, env)
    assert ran == TRAIN_STAGES | {"evaluate", "package"}, log
    assert "retrained adapters [0, 1] of [0, 1]" in log and "retrained adapters [2, 3] of [2, 3]" in log
    assert files(root, "data/encoded") == encoded
    now = files(root, "models/adapters")
    # training is the same function: the same weights; the summaries name the code that trained them
    assert {p: b for p, b in now.items() if p.endswith(".safetensors")} == \
        {p: b for p, b in adapters.items() if p.endswith(".safetensors")}
    assert all(now[p] != adapters[p] for p in now if p.endswith(".json"))
    assert stale(root, env) == set()
    assert "up to date" in legonet("build", cwd=root, env=env).stdout


def test_encode_keeps_its_rows_until_the_code_that_computes_an_embedding_changes(
        project: tuple[Path, dict[str, str]]) -> None:
    """A change to the `encode` stage's code reruns it, but it encodes no sample again and writes the same tables
    (nothing downstream reruns); a change to the payload preparation encodes every sample again."""
    root, env = project
    encoded = files(root, "data/encoded")
    stage = Path(env["PYTHONPATH"]) / "stages/encode.py"
    stage.write_text(stage.read_text() + "# other code, the same embeddings\n")
    assert sync(root, env)
    encode_stages = stale(root, env)
    assert encode_stages and all(name.startswith("encode@") for name in encode_stages)
    ran, log = repro(root, env)
    assert ran == encode_stages, log
    assert "encoded 0 of" in log and not re.search(r"encoded [1-9]", log), log
    assert files(root, "data/encoded") == encoded
    assert stale(root, env) == set()

    dataset = Path(env["PYTHONPATH"]) / "pipeline/data/dataset.py"
    reader = '    """What the encoder reads from a validated sample table'
    dataset.write_text(dataset.read_text().replace(reader, reader.replace("reads", "reads (another way)")))
    assert sync(root, env)
    ran, log = repro(root, env)
    assert encode_stages <= ran, log
    counts = re.findall(r"encode (\S+): encoded (\d+) of (\d+) samples", log)
    assert counts and all(done == total for _, done, total in counts), log
    assert stale(root, env) == set()


def test_a_library_version_reruns_the_stages_that_call_it(project: tuple[Path, dict[str, str]],
                                                          tmp_path: Path) -> None:
    """Another installed version of Great Expectations (a distribution found first on the path) reruns the quality
    checkpoint, and only what reads its result."""
    root, env = project
    dist = tmp_path / "site/great_expectations-0.0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: great_expectations\nVersion: 0.0.1\n")
    env = {"PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{dist.parent}"}
    assert sync(root, env)
    assert stale(root, env) == {"quality"}
    ran, log = repro(root, env)
    assert "quality" in ran and ran <= {"quality", "package"}, log
    assert stale(root, env) == set()


def test_the_file_cache_follows_the_racy_clean_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest is reused while the file's stat holds and it had settled before it was read; a file rewritten in
    place, same size, same mtime, right after it was hashed is hashed again."""
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"label,recall\n0,0.5\n")
    first = lineage.file_md5(path)
    times = path.stat()
    with open(path, "r+b") as handle:  # in place (the same inode), as pandas' to_csv writes
        handle.write(b"label,recall\n0,0.7\n")
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == \
        (times.st_ino, times.st_size, times.st_mtime_ns)
    assert lineage.file_md5(path) != first
    assert lineage.file_md5(path) == lineage._hash_file(path, "md5")

    calls: list[Path] = []

    def count(p: Path) -> int:
        calls.append(p)
        return len(calls)

    assert lineage.remembered(path, "count", count) == 1
    assert lineage.remembered(path, "count", count) == 2  # changed within RACY_NS of being read: read again
    monkeypatch.setattr(digeststore, "RACY_NS", 0)  # as if the file had settled long before it was read
    assert lineage.remembered(path, "count", count) == 2  # trusted: not read again
    path.write_bytes(b"label,recall\n0,0.9\n")  # any later write changes ctime
    assert lineage.remembered(path, "count", count) == 3


def test_a_digest_is_computed_once_for_all_processes_of_a_project_until_the_file_changes(tmp_path: Path) -> None:
    """The project's digest store: a file hashed by one process is not hashed again by the next while its stat holds
    (a planted value in the store comes back, in a second process), a rewrite is hashed again, the store keeps no
    row of a file that is gone, and a file outside any DVC project is simply hashed."""
    root = tmp_path / "project"
    root.mkdir()
    run("git", "init", "-q", cwd=root, env={})
    run(sys.executable, "-m", "dvc", "init", "-q", cwd=root, env={})
    (root / "data").mkdir()
    kept, gone = root / "data/kept.parquet", root / "data/gone.parquet"
    kept.write_bytes(b"kept bytes")
    gone.write_bytes(b"gone bytes")
    time.sleep(digeststore.RACY_NS / 1e9 + 0.1)  # both settle before they are read: their digests may be kept
    show = ("import json, sys; from pathlib import Path; from pipeline.tracking.lineage import file_md5; "
            "print(json.dumps([file_md5(Path(p)) for p in sys.argv[1:]]))")

    def digests(*paths: Path) -> list[str]:
        return json.loads(run(sys.executable, "-c", show, *map(str, paths), cwd=root, env={}).stdout)

    assert digests(kept, gone) == [lineage._hash_file(kept, "md5"), lineage._hash_file(gone, "md5")]
    with sqlite3.connect(root / digeststore.STORE) as db:
        assert sorted(db.execute("SELECT path, kind FROM digests")) == [("data/gone.parquet", "md5"),
                                                                         ("data/kept.parquet", "md5")]
        db.execute("UPDATE digests SET value = 'planted' WHERE path = 'data/kept.parquet'")
    assert digests(kept) == ["planted"]  # another process took it from the store, without reading the file
    kept.write_bytes(b"kept bytes")  # the same bytes rewritten: a new ctime, so read again
    gone.unlink()
    time.sleep(digeststore.RACY_NS / 1e9 + 0.1)
    assert digests(kept) == [lineage._hash_file(kept, "md5")]
    with sqlite3.connect(root / digeststore.STORE) as db:  # the row of the deleted file went when the store opened
        assert sorted(db.execute("SELECT path FROM digests")) == [("data/kept.parquet",)]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"no project")
    assert digests(outside) == [lineage._hash_file(outside, "md5")]
    assert oct((root / digeststore.STORE).stat().st_mode & 0o777) == "0o600"

    (root / digeststore.STORE).write_bytes(b"not a database")  # torn: started again, empty
    assert digests(kept) == [lineage._hash_file(kept, "md5")]
    with sqlite3.connect(root / digeststore.STORE) as db:
        assert sorted(db.execute("SELECT path FROM digests")) == [("data/kept.parquet",)]
    (root / digeststore.STORE).unlink()
    (root / digeststore.STORE).symlink_to(outside)  # a planted link is not followed
    assert digests(kept) == [lineage._hash_file(kept, "md5")]
    assert outside.read_bytes() == b"no project"


def test_dvc_saves_an_output_with_the_digest_its_stage_computed_only_under_the_same_stat(tmp_path: Path) -> None:
    """A forget's `dvc commit` takes each output's md5 from the digest store (the stage's lineage computed it)
    instead of reading the file again, but only while the file's stat is the one it was computed under: a planted
    digest is what DVC saves (so it was not hashed again), and a file rewritten since is hashed by DVC."""
    from dvc.repo import Repo, lock_repo

    from pipeline.runner.build import lend_digests

    root = tmp_path / "project"
    (root / "out").mkdir(parents=True)
    run("git", "init", "-q", cwd=root, env={})
    run(sys.executable, "-m", "dvc", "init", "-q", cwd=root, env={})
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: python -c pass\n    outs:\n      - out/kept.bin\n"
                                   "      - out/rewritten.bin\n")
    kept, rewritten = root / "out/kept.bin", root / "out/rewritten.bin"
    kept.write_bytes(b"kept bytes")
    rewritten.write_bytes(b"first bytes")
    time.sleep(0.05)  # hashed after the files' last change, as a stage hashes its outputs when it ends
    assert lineage.file_md5(kept) and lineage.file_md5(rewritten)
    with sqlite3.connect(root / digeststore.STORE) as db:
        db.execute("UPDATE digests SET value = ? WHERE path = 'out/kept.bin'", ("0" * 32,))
    rewritten.write_bytes(b"other bytes")  # the same size, rewritten after it was hashed
    found = digeststore.store_for(str(kept))
    assert found is not None
    found[0].rows.clear()  # what this process remembers goes: the rows come from the store (the worker's too)
    with Repo(str(root)) as repo, lock_repo(repo):
        (stage,) = [s for s in repo.index.stages if getattr(s, "name", None) == "make"]
        assert lend_digests(repo, [stage]) == 1
        stage.save()
        saved = {Path(out.fs_path).name: out.hash_info.value for out in stage.outs}
    assert saved == {"kept.bin": "0" * 32, "rewritten.bin": lineage._hash_file(rewritten, "md5")}


def test_the_digest_memo_answers_only_for_the_source_it_was_made_from(tmp_path: Path) -> None:
    """`check_code` remembers each stage's legonet digest under a digest of every legonet file: the memo gives
    what a fresh reach gives, is used while no file changed, and is not after any file changed (one the stage does
    not reach included); a torn memo is computed again."""
    env, memo = code_copy(tmp_path / "code"), tmp_path / "memo.json"
    show = ("import json; from pathlib import Path; from pipeline.project.reach import Reach, legonet_digest, "
            f"stage_digest; r = Reach(); r.root('stages.train'); print(json.dumps([stage_digest('stages.train', "
            f"Path({str(memo)!r})), legonet_digest(r)]))")
    remembered, fresh = json.loads(python(show, tmp_path, env))
    assert remembered == fresh
    (key,) = json.loads(memo.read_text())
    memo.write_text(json.dumps({key: {"stages.train": "planted"}}))
    assert json.loads(python(show, tmp_path, env)) == ["planted", fresh]  # the memo answers for the same source
    app = tmp_path / "code/pipeline/serve/app.py"  # a file the train stage does not reach
    app.write_text(app.read_text() + "# a comment\n")
    assert json.loads(python(show, tmp_path, env)) == [fresh, fresh]
    assert list(json.loads(memo.read_text())) != [key]
    memo.write_text('{"torn')
    assert json.loads(python(show, tmp_path, env)) == [fresh, fresh]
