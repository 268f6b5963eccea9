"""The stamp of the state `dvc status` last found up to date (pipeline.runner.uptodate): a forget skips that
status only while nothing DVC reads has changed, and still refuses a change that is not built.

Runtime: copies of the session's `built_project`; a few `dvc status` calls and one refused forget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import copy_project, legonet

from pipeline.data.dataset import read_table
from pipeline.purge.objects import dvc_cache, listing_entries, object_path
from pipeline.runner.build import _stages, dvc_status
from pipeline.runner.lockfile import write_lock
from pipeline.runner.outputs import lock_outputs
from pipeline.runner.uptodate import STAMP, still_up_to_date


def test_a_build_that_ran_stages_stamps_the_project(built_project: Path) -> None:
    """The first forget after `legonet build` skips its `dvc status` too: the build stamped what it built."""
    assert still_up_to_date(built_project)


def test_the_stamp_changes_with_whatever_dvc_status_reads(built_project: Path, tmp_path: Path) -> None:
    """Touched bytes, a removed cache object, an edited param, a new .dvc file: each breaks the stamp, so the
    real `dvc status` runs (and stamps again when it finds the project up to date)."""
    root = copy_project(built_project, tmp_path / "p")
    (root / STAMP).unlink(missing_ok=True)
    assert not still_up_to_date(root)
    assert dvc_status(root, stamp=True) == {}
    assert still_up_to_date(root)

    shard = sorted((root / "data/shards").rglob("*.parquet"))[0]
    info = shard.stat()
    os.utime(shard, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))  # the same bytes, touched
    assert not still_up_to_date(root)
    assert dvc_status(root, stamp=True) == {}  # DVC hashes it again and finds the bytes it recorded
    assert still_up_to_date(root)

    cached = object_path(dvc_cache(root), lock_outputs(root)["models/keys.npy"])
    kept = cached.read_bytes()
    cached.unlink()
    assert not still_up_to_date(root)
    assert dvc_status(root, stamp=True) != {}  # "not in cache"
    cached.write_bytes(kept)
    assert still_up_to_date(root)  # the state the stamp was taken in, again

    listing = next(md5 for md5 in lock_outputs(root).values() if md5.endswith(".dir"))
    entry = listing_entries(object_path(dvc_cache(root), listing).read_bytes(), listing)[0][1]
    cached = object_path(dvc_cache(root), entry)  # one file of a folder output: DVC finds it "not in cache" too
    kept = cached.read_bytes()
    cached.unlink()
    assert not still_up_to_date(root)
    assert dvc_status(root, stamp=True) != {}
    cached.write_bytes(kept)
    assert still_up_to_date(root)

    extra = root / "data/extra.parquet.dvc"
    extra.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef\n  size: 1\n  hash: md5\n  path: extra.parquet\n")
    assert not still_up_to_date(root)
    extra.unlink()
    assert still_up_to_date(root)

    params = root / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("weight_decay: 0.0001", "weight_decay: 0.001", 1))
    assert params.read_text() != text
    assert not still_up_to_date(root)
    assert dvc_status(root, stamp=True) != {}
    params.write_text(text)


def test_a_forget_refuses_a_change_not_built_though_the_last_status_was_clean(built_project: Path,
                                                                            tmp_path: Path) -> None:
    root = copy_project(built_project, tmp_path / "p")
    assert dvc_status(root, stamp=True) == {} and still_up_to_date(root)
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("weight_decay: 0.0001", "weight_decay: 0.001", 1))
    sample = read_table(root / "data/routing.parquet", ["sample_id"])["sample_id"].iloc[0]
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"request_id": "req-1", "sample_ids": [sample], "reason": "GDPR Art. 17",
                                    "received_at": "2024-05-01T09:30:00Z"}))
    result = legonet("forget", str(manifest), cwd=root, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "changes that are not built yet" in output, output
    assert not (root / "audit/records").is_dir() or not list((root / "audit/records").glob("*req-1*"))


def test_a_params_file_of_a_stage_the_team_added_is_part_of_the_stamp(built_project: Path, tmp_path: Path) -> None:
    """A stage a team adds may read its own params file (`params: - custom.yaml: [...]`): DVC records it in
    dvc.lock beside params.yaml, so an edit to it must break the stamp as an edit to params.yaml does."""
    root = copy_project(built_project, tmp_path / "p")
    (root / "custom.yaml").write_text("threshold: 1\n")
    with (root / "dvc.yaml").open("a") as pipeline:  # `stages:` is the file's last key
        pipeline.write("  note:\n    cmd: python -c \"open('reports/note.txt', 'w').write('x')\"\n"
                       "    params:\n      - custom.yaml:\n          - threshold\n"
                       "    outs:\n      - reports/note.txt\n")
    subprocess.run(["dvc", "repro", "note"], cwd=root, check=True, capture_output=True)
    assert dvc_status(root, stamp=True) == {} and still_up_to_date(root)
    (root / "custom.yaml").write_text("threshold: 2\n")
    assert not still_up_to_date(root)
    assert any(name.endswith(":note") for name in dvc_status(root, stamp=True))  # the real status: changed param
    (root / "custom.yaml").write_text("threshold: 1\n")
    assert dvc_status(root, stamp=True) == {} and still_up_to_date(root)


def test_a_rerun_writes_dvc_lock_byte_for_byte_as_dvc_does(built_project: Path, tmp_path: Path) -> None:
    """`write_lock` rewrites only the blocks of the stages that ran, yet gives DVC's own bytes: a lock whose entry
    of `assign` is missing and whose entry of `quality` is stale comes back as DVC's `dump_stages` writes it (the
    original), and a lock DVC's round trip must handle (a comment) is left to DVC."""
    from dvc.repo import Repo, lock_repo

    root = copy_project(built_project, tmp_path / "p")
    lock = root / "dvc.lock"
    original = lock.read_text()
    assign = original[original.index("\n  assign:\n") + 1:original.index("\n  train@0000:\n") + 1]
    quality_at = original.index("\n  quality:\n")
    md5_at = original.index("md5: ", quality_at) + len("md5: ")
    damaged = (original[:md5_at] + "f" * 32 + original[md5_at + 32:]).replace(assign, "")
    commented = original.replace("stages:\n", "stages:\n  # kept by DVC's round trip\n", 1)
    with Repo(str(root)) as repo, lock_repo(repo):
        stages = _stages(repo, ["assign", "train@0000", "quality"])
        for start in (damaged, commented):
            lock.write_text(start)
            stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
            by_dvc = lock.read_text()
            lock.write_text(start)
            write_lock(stages)
            assert lock.read_text() == by_dvc
        assert by_dvc.startswith("schema: '2.0'\nstages:\n  # kept by DVC's round trip\n")
        lock.write_text(damaged)
        write_lock([stages[0], stages[2]])
    assert lock.read_text() == original.replace(assign, "") + assign  # a stage new to the lock goes last


def test_dvc_add_through_a_files_own_pointer_writes_what_dvc_add_writes(built_project: Path, tmp_path: Path) -> None:
    """A forget's `dvc add` of the files it rewrote: a file its own .dvc pointer tracks is saved through that
    pointer, without DVC's index; the pointer, the cache and `dvc status` end as after `dvc add` itself, and a
    file no pointer tracks yet goes to `dvc add` (the same pointer as DVC's command line writes)."""
    from pipeline.data.dataset import write_table
    from pipeline.runner.build import dvc_add

    roots = [copy_project(built_project, tmp_path / name) for name in ("by-dvc", "by-legonet")]
    raw, new = "data/raw/part-0000.parquet", "data/new.bin"
    for root in roots:
        frame = read_table(root / raw)
        write_table(frame.iloc[1:], root / raw)  # a forget removed a row
        (root / new).write_bytes(b"not tracked yet")
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", raw, new], cwd=roots[0], check=True)
    dvc_add(roots[1], [raw, new])
    for pointer in (f"{raw}.dvc", f"{new}.dvc"):
        assert (roots[1] / pointer).read_bytes() == (roots[0] / pointer).read_bytes(), pointer
    md5 = (roots[1] / f"{raw}.dvc").read_text().split("md5: ")[1].split()[0]
    assert object_path(dvc_cache(roots[1]), md5).read_bytes() == (roots[1] / raw).read_bytes()
    statuses = [{name.rsplit(":", 1)[-1]: found for name, found in dvc_status(root).items()} for root in roots]
    assert statuses[0] == statuses[1] == {"encode@part-0000": [{"changed deps": {raw: "modified"}}]}
