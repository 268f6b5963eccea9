"""Per-file work on one thread per core, for `assign`, which reads and writes every shard a forget changed.

A 100-sample forget at 280k samples changes all 32 shards, and no other stage can run beside `assign` (every later
one reads the shards), so one core idled through seconds of it. The work is Parquet's zstd and md5, which release the
GIL, so threads share it out without a process per file. Which thread handles a file never changes its bytes.
(`baseline`, which recomputes the changed shards' probe statistics, gained nothing from it: it runs beside
`package`, which then took as long as `baseline` saved; docs/benchmarks.md.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T, R = TypeVar("T"), TypeVar("R")


def each(work: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[work(item) for item in items]``, in that order, on one thread per core; the first error is raised."""
    todo = list(items)
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        return list(pool.map(work, todo))
