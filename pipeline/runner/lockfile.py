"""dvc.lock rewritten for the stages a rerun ran: the bytes DVC writes, without DVC's whole-file round trip.

DVC records stages in dvc.lock by loading the whole file with ruamel's round-trip loader (it keeps comments and
styles), updating the stages' entries and dumping the whole file again. The file holds one entry per stage, and
there is one `encode` stage per data partition, so that cost grows with N: 0.67 s to load and 0.28 s to dump the
109 KB lock of a 280k-image project, 2.0 s and 1.1 s at a million rows, on every forget. DVC writes each stage as
a block of lines under ``stages:`` (the stage's name at two spaces, the rest deeper), so only the blocks of the stages
that ran are dumped again, by DVC's own serializer and YAML settings, at the same indentation, and spliced in place
of their old blocks (a new stage's block goes last, where DVC's dict update puts it). The result is byte for byte
what DVC writes (tests/test_uptodate.py compares the two). A lock that is not laid out as DVC writes it (edited by
hand, comments, YAML anchors) is left to DVC itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.data.dataset import write_bytes_atomic

HEADER = "schema: '2.0'\nstages:\n"
STAGE_LINE = re.compile(r"^  [^ #-].*:$")  # a stage's first line: its name, two spaces in
NESTED_LINE = re.compile(r"^   ")  # any deeper line belongs to the stage above it


def write_lock(stages: Sequence[Any]) -> None:
    """Record ``stages`` (DVC Stage objects, saved) in their lock files, as DVC's ``dump_stages`` would: each
    pipeline file's stages in the lock file beside it."""
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    from dvc.stage import PipelineStage

    by_file: dict[str, list[Any]] = {}
    for stage in stages:
        by_file.setdefault(stage.dvcfile.path, []).append(stage)
    for dvcfile, group in by_file.items():
        if isinstance(group[0], PipelineStage):
            _write_stages(Path(f"{os.path.splitext(dvcfile)[0]}.lock"), group)
        else:  # a .dvc file holds its one stage itself
            group[0].dvcfile.dump_stages(group, update_pipeline=False)


def _write_stages(path: Path, stages: list[Any]) -> None:
    from dvc.stage import serialize
    from dvc.utils.serialize import dumps_yaml

    blocks = _blocks(path.read_text() if path.is_file() else HEADER)
    dumped = [_block(dumps_yaml({"stages": serialize.to_lockfile(stage)})) for stage in stages]
    if blocks is None or any(block is None for block in dumped):
        stages[0].dvcfile.dump_stages(stages, update_pipeline=False)
        return
    for block in dumped:
        blocks[block[0]] = block
    write_bytes_atomic(path, (HEADER + "".join("".join(block) for block in blocks.values())).encode())


def _blocks(text: str) -> dict[str, list[str]] | None:
    """The stage blocks of a lock laid out as DVC writes it (header, then blocks), keyed by their first line; None
    for any other layout."""
    if not text.startswith(HEADER) or "&" in text or "#" in text:  # an anchor or a comment: DVC's own round trip
        return None
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text[len(HEADER):].splitlines(keepends=True):
        if STAGE_LINE.match(line.rstrip("\n")):
            if line in blocks:
                return None
            current = blocks[line] = [line]
        elif current is not None and NESTED_LINE.match(line):
            current.append(line)
        else:
            return None
    return blocks


def _block(text: str) -> list[str] | None:
    """The one stage block of a dump of ``{"stages": {name: entry}}``."""
    found = _blocks(f"schema: '2.0'\n{text}")
    return next(iter(found.values())) if found is not None and len(found) == 1 else None
