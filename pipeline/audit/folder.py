"""The log's folder: which of its entries are record files, and each record read once per change.

A record is a regular file named ``NNNNNN-<request_id>.json`` directly in ``audit/records``; anything else there
(at any depth) is reported, never skipped, because a reader that skips a file cannot tell a harmless leftover
from a record someone hid (docs/design.md section 9).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.audit.checks import Entry
from pipeline.audit.envelope import sha256_hex
from pipeline.audit.transparency import leaf_hash
from pipeline.data.ids import REQUEST_ID_PATTERN
from pipeline.tracking.lineage import remembered

RECORD_NAME = re.compile(r"(\d{6,})-(" + REQUEST_ID_PATTERN.removeprefix("^").removesuffix("$") + r")\.json")


def listing(log_dir: Path) -> tuple[list[Entry], list[Path]]:
    """The record files (regular files only: a planted FIFO or link must not block or redirect a reader) in
    sequence order, and the strays: every other entry of the records folder, at any depth (a record hidden
    in a subfolder or renamed ``*.json.bak`` is refused, not skipped), but for the temporary file of a write
    in progress. A records folder that is a link (or inside one) is itself a stray: the log is the
    repository's own folder, never a directory elsewhere that a link points at."""
    entries, strays = [], []
    if _linked(log_dir):
        return [], [log_dir]
    if not log_dir.is_dir():
        return [], []
    for top, folders, files in os.walk(log_dir):
        where = Path(top)
        for name in [*folders, *files]:
            match = RECORD_NAME.fullmatch(name) if where == log_dir else None
            item = where / name
            if match and item.is_file() and not item.is_symlink():
                entries.append(Entry(int(match[1]), match[2], item))
            elif not (where == log_dir and _writing(name)):
                strays.append(item)
    return sorted(entries, key=lambda e: (e.sequence, e.path.name)), sorted(strays)


def stray_reason(path: Path, log_dir: Path) -> str:
    if path == log_dir:
        return "is a symbolic link (or inside one): the records must be a real folder of the repository"
    if path.is_dir() and not path.is_symlink():
        return "a folder inside the records folder: records sit directly in it, nothing else does"
    return f"not a record (a regular file named NNNNNN-<request_id>.json directly in {log_dir.name}/)"


def _linked(folder: Path) -> bool:
    """Whether ``folder`` or its parent is a symbolic link (``audit/records`` or ``audit``)."""
    return folder.is_symlink() or folder.parent.is_symlink()


_WRITING = re.compile(r"\.(\d{6,}-[A-Za-z0-9._-]+\.json)\.tmp-(\d+)")


def _writing(name: str) -> bool:
    """A record being written atomically by a live process (``write_bytes_atomic``'s temporary name)."""
    match = _WRITING.fullmatch(name)
    if match is None:
        return False
    try:
        os.kill(int(match[2]), 0)
    except ProcessLookupError:
        return False  # its writer died: a leftover, reported so that it is removed
    except PermissionError:
        return True
    return True


def read_record(path: Path) -> tuple[bytes, str, bytes]:
    """A record file's bytes, sha256 and Merkle leaf hash, read again only when the file may have changed (the
    process's one file cache, ``remembered``: git's racy-clean rule).

    Each pass must know every record's digest; reading and hashing all of them again on each of the several
    passes of a forget grew with the log's history.
    """
    return remembered(path, "audit-record", _record)


def _record(path: Path) -> tuple[bytes, str, bytes]:
    data = path.read_bytes()
    return data, sha256_hex(data), leaf_hash(data)
