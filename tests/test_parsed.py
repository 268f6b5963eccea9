"""Each YAML text parsed once per process (pipeline.runner.parsed): the answers never change, only their cost.

Runtime: one copy of the session's `built_project`; a few in-process `dvc status` calls, each against the `dvc status`
command (a fresh process, DVC's own parsing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import copy_project

from pipeline.runner.build import dvc_status
from pipeline.runner.parsed import parse_once, read_yaml_once


def _command_status(root: Path) -> dict:
    """`dvc status --json` in a new process: DVC parsing every file itself."""
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out or "{}")


def _status(root: Path) -> dict:
    """`dvc status` in this process (the memo installed), addressed from the project's root as the command is."""
    found = dvc_status(root)
    return {(key.rsplit("dvc.yaml:", 1)[1] if "dvc.yaml:" in key
             else Path(os.path.normpath(Path.cwd() / key)).relative_to(root).as_posix()): value
            for key, value in found.items()}


def _rewrite_in_place(path: Path, text: str) -> None:
    """New text in the same file (same inode), its old mtime put back: only the bytes tell the change."""
    info = path.stat()
    with open(path, "r+") as handle:
        handle.write(text)
        handle.truncate()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def test_dvc_in_process_answers_as_the_dvc_command_after_edits_that_keep_size_inode_and_mtime(
        built_project: Path, tmp_path: Path) -> None:
    """A param edited to a value of the same length, and a .dvc file edited the same way, each in place with the
    old mtime: the in-process status (memo installed, earlier parses of the old texts kept) reports exactly what
    `dvc status` reports, and the project is up to date again once the old texts are back."""
    root = copy_project(built_project, tmp_path / "p")
    assert _status(root) == {} == _command_status(root)  # parses every file once, the memo filled

    params = root / "params.yaml"
    text = params.read_text()
    edited = text.replace("weight_decay: 0.0001", "weight_decay: 0.0002", 1)
    assert edited != text and len(edited) == len(text)
    _rewrite_in_place(params, edited)
    stale = _status(root)
    assert stale and stale == _command_status(root)
    assert any("adapters.train" in json.dumps(v) for v in stale.values())  # the train stages' param changed
    _rewrite_in_place(params, text)
    assert _status(root) == {} == _command_status(root)

    pointer = sorted((root / "data").rglob("*.dvc"))[0]
    text = pointer.read_text()
    md5 = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "md5:" in line)
    edited = text.replace(md5, md5[::-1], 1)
    _rewrite_in_place(pointer, edited)
    stale = _status(root)
    assert stale and stale == _command_status(root)
    _rewrite_in_place(pointer, text)
    assert _status(root) == {} == _command_status(root)


def test_every_reader_gets_its_own_copy_of_a_parse(tmp_path: Path) -> None:
    """Callers may change what they read: a change to one copy never reaches the next reader, and a file whose
    bytes changed is parsed again."""
    path = tmp_path / "x.yaml"
    path.write_text("stages:\n  a:\n    outs: [x]\n")
    first = read_yaml_once(path)
    first["stages"]["a"]["outs"].append("y")
    assert read_yaml_once(path) == {"stages": {"a": {"outs": ["x"]}}}
    path.write_text("stages:\n  a:\n    outs: [z]\n")
    assert read_yaml_once(path) == {"stages": {"a": {"outs": ["z"]}}} == parse_once(path.read_bytes())
