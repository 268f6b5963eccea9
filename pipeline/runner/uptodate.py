"""The state `dvc status` last found up to date: a stamp that lets the next forget skip a `dvc status` whose answer
cannot have changed.

A forget needs the project up to date before it starts (it reruns only what its rows reach), and checks the same
after its rebuild. `dvc status` answers from what DVC reads: the pipeline files (dvc.yaml, dvc.lock, params.yaml, the
files dvc.yaml reads as `vars`, any other params file a stage declares, the .dvc files), each tracked file's size,
mtime and inode (its state database trusts an unchanged stat, as ``artifact_digests`` does) and whether each recorded
object (a folder's listing and each file object it names) is in the cache. The stamp is a digest of exactly those,
taken right after a status came back empty; while the project still gives the same digest, the status would come back
empty again, and the check costs a walk of the tracked files instead of DVC's per-stage work, which grows with the
number of stages (one `encode` stage per partition; docs/design.md section 4). Any change to what DVC reads (a file
edited, added, removed or touched, a param, a cache object deleted) gives another digest, and the forget runs the
real `dvc status`. `legonet audit verify` never relies on it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pipeline.project.layout import STATE_DIR
from pipeline.project.scratch import write_private
from pipeline.purge.objects import dvc_cache, expand_dirs, object_path, valid_digest
from pipeline.runner.parsed import read_yaml_once

STAMP = STATE_DIR / "up-to-date"
PIPELINE_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore")
SKIPPED = {".git", ".dvc", STATE_DIR.name, "mlartifacts"}


def stamp(root: Path) -> str:
    """The digest of what `dvc status` reads in ``root`` (see the module docstring)."""
    digest = hashlib.sha256()
    pipeline = read_yaml_once(root / "dvc.yaml") if (root / "dvc.yaml").is_file() else {}
    lock = read_yaml_once(root / "dvc.lock") if (root / "dvc.lock").is_file() else {}
    stages = list(((lock or {}).get("stages") or {}).values())
    named = [*PIPELINE_FILES, *(v for v in (pipeline or {}).get("vars") or [] if isinstance(v, str))]
    named += sorted({f for stage in stages for f in stage.get("params") or {}} - set(named))  # a stage's own file
    dvc_files = _dvc_files(root)
    for rel in [*named, *dvc_files]:
        path = root / rel
        digest.update(f"{rel}\0".encode() + (hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"-"))
    tracked, objects = _tracked(root, stages, dvc_files)
    for rel in sorted(tracked):
        for path in _files(root / rel):
            try:
                info = path.stat()
            except FileNotFoundError:
                digest.update(f"{path.relative_to(root).as_posix()}\0missing\n".encode())
                continue
            digest.update(f"{path.relative_to(root).as_posix()}\0{info.st_size}\0{info.st_mtime_ns}\0"
                          f"{info.st_ino}\n".encode())
    cache = dvc_cache(root)
    for md5 in sorted(expand_dirs(cache, objects)):  # a folder's listing and each file object it names
        digest.update(f"{md5}\0{object_path(cache, md5).is_file()}\n".encode())
    return digest.hexdigest()


def _dvc_files(root: Path) -> list[str]:
    """Every .dvc file of the project, as DVC collects them, outside the folders that never hold one (git's, DVC's,
    legonet's state and MLflow's artifacts: walking them would cost more than the status saved)."""
    found = []
    for folder, dirs, names in os.walk(root):
        if folder == str(root):
            dirs[:] = [d for d in dirs if d not in SKIPPED]
        found += [Path(folder, n).relative_to(root).as_posix() for n in names if n.endswith(".dvc")]
    return sorted(found)


def _tracked(root: Path, stages: list[dict[str, Any]], dvc_files: list[str]) -> tuple[set[str], set[str]]:
    """The paths DVC tracks (every dvc.lock stage's deps and outs, the .dvc files' outs) and the digests of the
    outputs it keeps in the cache."""
    paths: set[str] = set()
    objects: set[str] = set()
    for stage in stages:
        for item in [*(stage.get("deps") or []), *(stage.get("outs") or [])]:
            paths.add(item["path"])
        objects.update(o["md5"] for o in stage.get("outs") or [] if valid_digest(o.get("md5")))
    for rel in dvc_files:
        folder = Path(rel).parent
        for out in (read_yaml_once(root / rel) or {}).get("outs") or []:
            paths.add((folder / out["path"]).as_posix())
            objects.update([out["md5"]] if valid_digest(out.get("md5")) else [])
    return paths, objects


def _files(path: Path) -> list[Path]:
    """The file ``path``, or every file under the folder ``path`` (sorted), or ``path`` itself when it is gone."""
    if path.is_dir():
        return sorted(Path(folder, name) for folder, _, names in os.walk(path) for name in names)
    return [path]


def status(repo: Any) -> dict[str, Any]:
    """`dvc status` of DVC's ``repo`` ({} when up to date), stamping the project when it is."""
    found = repo.status()
    path = Path(repo.root_dir) / STAMP
    current = b"" if found else stamp(Path(repo.root_dir)).encode()
    if current and not (path.is_file() and path.read_bytes() == current):  # written only when it changes
        write_private(path, current)
    return found


def still_up_to_date(root: Path) -> bool:
    """Whether nothing `dvc status` reads changed since ``status`` found the project up to date: its answer would
    be empty again."""
    path = root / STAMP
    return path.is_file() and path.read_text() == stamp(root)
