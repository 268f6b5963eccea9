"""Per-file work on one thread per core, for the stages that read or write every shard a forget changed.

A 100-sample forget at 280k samples changes all 32 shards; `assign` rewrites them and `baseline` recomputes their
probe statistics, while the second core has little else to do (no stage can run beside `assign`: every later one
reads the shards; only `package` runs beside `baseline`, and ends sooner). The work is Parquet's zstd, md5 and numpy's einsum loops, which release the GIL, so
threads share it out without a process per file. Which thread handles a file never changes its bytes.
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
