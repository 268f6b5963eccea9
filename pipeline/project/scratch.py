"""The project's private folder ``.legonet/``: owner-only state files (``write_private``: the journal, pending
purges, the object memo), and scratch folders for files that hold sample data or weights while a command works (a
package being staged, a shard re-derived by `audit verify --rebuild`).

They live in the project's ``.legonet/tmp/`` (owner-only, never in git), named for the process that made them, and
not in the system's temporary folder: a process killed mid-way (SIGKILL, OOM, a lost machine) cannot remove its own,
and a folder elsewhere would keep whole adapters, or rows of a forgotten sample, out of every purge's reach. Each new
scratch folder first sweeps the ones whose process is gone, so the next command that stages anything (every forget
packages its model) removes what a crash left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.project.layout import STATE_DIR

SCRATCH = STATE_DIR / "tmp"


@contextmanager
def scratch_dir(root: Path, purpose: str) -> Iterator[Path]:
    """A fresh private folder under ``root/.legonet/tmp`` for ``purpose``, removed on exit."""
    base = root / SCRATCH
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep(base)
    folder = Path(tempfile.mkdtemp(prefix=f"{purpose}-{os.getpid()}-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(base: Path) -> list[str]:
    """Remove the scratch folders under ``base`` whose process no longer runs; returns their names."""
    gone = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        pid = _owner(folder.name)
        if pid is not None and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder.name)
    return gone


def _owner(name: str) -> int | None:
    parts = name.split("-")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_private(path: Path, data: bytes) -> None:
    """Owner-only state (the journal, pending purges, the object memo: they hold what a forget still needs):
    atomic replace through an owner-only temporary file (never through a planted link), then fsync the folder so
    the new entry survives a crash."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
