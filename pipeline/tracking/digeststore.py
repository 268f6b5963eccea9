"""The project's file digests, remembered across processes: ``.legonet/digests.sqlite``.

Each process of a forget (the command, its stage worker, a stage DVC runs) hashes the files it reads to record
their lineage and to decide what it can reuse: `assign` hashes every encoded partition (462 MB at 280k images),
`quality` and `baseline` every shard. The files a forget does not rewrite are the same bytes each time, so hashing
them again costs time in proportion to the data (N), not to the request. The store keeps, per file, the digest and
the stat it was computed under, and gives it back under the rule ``lineage.remembered`` applies within a process
(git's racy-clean rule): the file's (inode, size, mtime, ctime) are those it was computed under, and the file had
not changed for ``RACY_NS`` before it was read. Nobody can set ctime, so a rewrite always shows; a rewrite within the
filesystem clock's tick is caught by the racy rule. DVC's own state database trusts a file's stat the same way.

The store lives in the DVC project that holds the file (the nearest folder with a ``.dvc`` folder), keyed by the
path inside it, so a copy of the project (new inodes) starts from nothing and a moved file is hashed again. When a
process first opens it, rows whose file is gone or changed are dropped: a file a forget deleted or rewrote keeps
its row (a digest, never contents) only until the next command that hashes a file of the project opens the store.
A store that cannot be read is recreated empty. What trusts it: the stages' reuse decisions and the forget's own
checks, as DVC trusts its state database (a row could only mislead them for a file whose stat it matches, and
nobody but root can forge a ctime); `audit verify` does not, it hashes every file it checks (``lineage.fresh_md5``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from pipeline.project.layout import STATE_DIR

STORE = STATE_DIR / "digests.sqlite"
RACY_NS = 2_000_000_000  # a file changed this close before it was read may change again and keep its stat

# the stat a digest was computed under: (inode, size, mtime_ns, ctime_ns)
Stat = tuple[int, int, int, int]

_ROOTS: dict[str, Path | None] = {}  # folder -> the DVC project holding it (None: none)
_STORES: dict[Path, DigestStore] = {}


def stat_of(found: os.stat_result) -> Stat:
    return found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns


def trusted(stat: Stat, known: Stat, computed_ns: int) -> bool:
    """Whether a digest computed at ``computed_ns`` under ``known`` holds for a file whose stat is ``stat``."""
    return known == stat and stat[3] < computed_ns - RACY_NS


class DigestStore:
    """The digests of one project's files (one SQLite file; the processes of a forget share it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pid = os.getpid()
        self.rows: dict[tuple[str, str], tuple[Stat, int, str]] = {}
        self.db: sqlite3.Connection | None = None
        try:
            self._open()
        except sqlite3.OperationalError:  # busy past the timeout, read-only: this process works without it
            self._close()
        except sqlite3.DatabaseError:  # not a database (a crash, a copy mid-write): start again empty
            self._close()
            (root / STORE).unlink(missing_ok=True)
            try:
                self._open()
            except sqlite3.Error:
                self._close()  # the project works without the store: every digest is computed

    def _open(self) -> None:
        path = self.root / STORE
        path.parent.mkdir(mode=0o700, exist_ok=True)
        if path.is_symlink():  # never through a planted link (as every file of .legonet/)
            return
        with contextlib.suppress(FileExistsError):  # owner-only from its first byte
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        # a rollback journal, not WAL: a process that only reads leaves the file as it was (no -wal, -shm files)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA synchronous=OFF")  # a cache: a write lost in a crash costs one hash
        self.db.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT, kind TEXT, ino INTEGER, size INTEGER, "
                        "mtime INTEGER, ctime INTEGER, computed INTEGER, value TEXT, PRIMARY KEY (path, kind))")
        stale = []
        for rel, kind, ino, size, mtime, ctime, computed, value in self.db.execute("SELECT * FROM digests"):
            try:
                stat = stat_of(os.stat(self.root / rel))
            except OSError:
                stat = None
            if stat is not None and trusted(stat, (ino, size, mtime, ctime), computed):
                self.rows[(rel, kind)] = ((ino, size, mtime, ctime), computed, value)
            else:
                stale.append((rel, kind))
        if stale:
            self.db.executemany("DELETE FROM digests WHERE path = ? AND kind = ?", stale)

    def _close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.db = None

    def get(self, rel: str, kind: str, stat: Stat) -> str | None:
        known = self.rows.get((rel, kind))
        if known is None or not trusted(stat, *known[:2]):  # another process may have computed it since
            known = self._read(rel, kind)
        return known[2] if known is not None and trusted(stat, *known[:2]) else None

    def _read(self, rel: str, kind: str) -> tuple[Stat, int, str] | None:
        if self.db is None:
            return None
        try:
            row = self.db.execute("SELECT ino, size, mtime, ctime, computed, value FROM digests "
                                  "WHERE path = ? AND kind = ?", (rel, kind)).fetchone()
        except sqlite3.Error:
            return None
        if row is None:
            return None
        self.rows[(rel, kind)] = (tuple(row[:4]), row[4], row[5])
        return self.rows[(rel, kind)]

    def put(self, rel: str, kind: str, stat: Stat, computed_ns: int, value: str) -> None:
        self.rows[(rel, kind)] = (stat, computed_ns, value)
        if self.db is None:
            return
        with contextlib.suppress(sqlite3.Error):  # busy or read-only: the digest is right, only not remembered
            self.db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (rel, kind, *stat, computed_ns, value))


def project_of(path: str) -> Path | None:
    """The DVC project (a folder with a ``.dvc`` folder) that holds the file at absolute ``path``, if any."""
    folder = os.path.dirname(path)
    if folder not in _ROOTS:
        parent = os.path.dirname(folder)
        _ROOTS[folder] = (Path(folder) if os.path.isdir(os.path.join(folder, ".dvc"))
                          else None if parent == folder else project_of(os.path.join(parent, "x")))
    return _ROOTS[folder]


def store_for(path: str) -> tuple[DigestStore, str] | None:
    """The store of the project holding the file at absolute ``path`` and the file's path in it, or None (a file
    outside any DVC project, or inside the store's own folder)."""
    root = project_of(path)
    if root is None:
        return None
    rel = Path(path).relative_to(root).as_posix()
    if rel.startswith(f"{STATE_DIR.as_posix()}/"):
        return None
    store = _STORES.get(root)
    if store is None or store.pid != os.getpid():  # a forked child opens its own connection
        store = _STORES[root] = DigestStore(root)
    return store, rel
