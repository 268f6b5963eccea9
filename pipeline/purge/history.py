"""Which DVC objects a forget dooms: the objects the project's history references whose lineage includes a
forgotten sample (docs/remote-stores.md, "Which objects a forget purges").

History is every ``dvc.lock`` and ``.dvc`` file of every git commit reachable from a ref (branches, tags, the
``refs/exps`` refs of `dvc exp`), read with one `git rev-list --all --objects` and one `git cat-file --batch`,
plus DVC's run-cache (``<cache>/runs``). Each stage entry is one run: the objects it read (deps) and wrote (outs),
by md5, files inside directory outputs included. Within a run:

* a **sample table** (a Parquet object with a ``sample_id`` column) is doomed when it holds a forgotten ID, or when
  its run read a doomed object that is not a sample table (the per-adapter evaluation outputs of a doomed
  adapter). Rows decide, not the run: the stages that write sample tables (encode, assign) map each row on its
  own, so a shard that never held the sample is not derived from it although its run read a partition that did;
* **any other object** is doomed when its run read a doomed object, transitively: the adapters trained on a shard
  that held the sample, probe statistics, quality reports, evaluation outputs, packages;
* a directory listing is doomed when a file it lists is.

An object the workspace references is never doomed, and an object no part of the history references is never
looked at, whatever it holds. What an object holds is read once per digest (an object's content never changes)
and kept in ``.legonet/objects/``: sample IDs as keyed 64-bit digests, directory listings as they are. So are the
runs of each document read (``history_runs``), and an object an earlier forget purged is decided for good: a forget
reads only the history added since the last one. What still grows with history is small: the `git rev-list` walk
and the memo file (docs/benchmarks.md, "Soak").
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.data.dataset import read_yaml
from pipeline.project.layout import STATE_DIR
from pipeline.project.scratch import write_private
from pipeline.purge.objects import (
    DIR_SUFFIX,
    Stores,
    expand_dirs,
    listing_entries,
    object_path,
    purged_map,
    record_purged,
    referenced_objects,
    valid_digest,
    workspace_outputs,
)

MEMO = STATE_DIR / "objects"
Run = tuple[frozenset[str], frozenset[str]]  # the file objects a stage run read, and the objects it wrote
ID_DIGEST = np.dtype(np.uint64)  # one keyed 64-bit ID digest (``ObjectIndex.id_digests``) as an integer
BATCH_IDS = 4_000_000  # IDs digested in one pass of ``ObjectIndex.read_ids`` (about 0.3 GB of Arrow text at most)


class ObjectIndex:
    """What each object holds, by digest: a directory listing, a sample table's IDs (keyed digests), or other.

    Read from the memo, else from the first store that has the object (none given: the memo only); an object
    no store has and the memo does not know is unknown (None). A file object a forget purged (``gone``, the
    purged map) is unknown without a look: the purge deleted it from every store and dropped it from the memo
    (``drop``), and `legonet audit verify` reports one that comes back. So each forget's cost does not grow
    with the objects earlier forgets purged."""

    def __init__(self, root: Path, stores: Stores | None) -> None:
        self.folder = root / MEMO
        self.stores = stores
        self.gone = frozenset(purged_map(root))
        self._entries: dict[str, dict[str, Any] | None] = {}
        self._key: bytes | None = None
        self.tables_read = 0  # sample tables whose IDs this index read (every other answer came from the memo)

    def key(self) -> bytes:
        """The memo's own secret: a memo copied off the machine does not confirm a guessed ID."""
        if self._key is None:
            path = self.folder / "key"
            if not path.is_file():
                self.write(path, os.urandom(32))
            self._key = path.read_bytes()
        return self._key

    def id_digests(self, sample_ids: Iterable[str]) -> set[bytes]:
        return set(self._digests([str(i) for i in sample_ids]))

    def _digests(self, sample_ids: list[str]) -> list[bytes]:
        """The keyed 64-bit digest of each ID, in order."""
        keyed = hashlib.blake2b(key=self.key(), digest_size=8)  # the key's block compressed once, not per ID
        copy = keyed.copy

        def digest(sample_id: str) -> bytes:
            one = copy()
            one.update(sample_id.encode())
            return one.digest()

        return [digest(i) for i in sample_ids]

    def entry(self, md5: str, source: Path | None = None) -> dict[str, Any] | None:
        """What object ``md5`` holds; ``source``: a file known to have that digest (a workspace file whose md5 DVC
        recorded), read when the memo does not know the object and before any store."""
        known = self._entries.get(md5)
        if known is not None or (source is None and (md5 in self._entries or (
                md5 in self.gone and not md5.endswith(DIR_SUFFIX)))):
            return known
        memo = self.folder / md5 if valid_digest(md5) else None
        found: dict[str, Any] | None = None
        if memo is not None and memo.is_file():
            try:
                found = json.loads(memo.read_bytes())
            except ValueError:  # a torn or damaged memo entry is read again from the stores
                found = None
        if found is None and memo is not None and (content := self._content(md5, source)) is not None:
            found = self._describe(md5, content)
            self.write(memo, json.dumps(found).encode())
        self._entries[md5] = found
        return found

    def _content(self, md5: str, source: Path | None) -> Path | bytes | None:
        if source is not None and source.is_file():
            return source
        return self.stores.read(md5) if self.stores else None

    def write(self, path: Path, data: bytes) -> None:
        self.folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, data)

    def _describe(self, md5: str, content: Path | bytes) -> dict[str, Any]:
        """A listing's entries; for a file, only whether it is a sample table (its footer): what it holds is read
        when asked (``holds``), so the versions a forget supersedes, doomed anyway, are never read whole."""

        if md5.endswith(DIR_SUFFIX):
            return {"kind": "listing", "entries": listing_entries(
                content.read_bytes() if isinstance(content, Path) else content, md5)}
        if isinstance(content, Path):
            with open(content, "rb") as handle:
                magic = handle.read(4)
        else:
            magic = content[:4]
        try:
            table = magic == b"PAR1" and "sample_id" in pq.read_schema(_source(content)).names
        except (OSError, ValueError, pa.ArrowException):
            table = False
        return {"kind": "table" if table else "other"}

    def listing(self, md5: str) -> list[tuple[str, str]] | None:
        entry = self.entry(md5)
        return [tuple(e) for e in entry["entries"]] if entry and entry["kind"] == "listing" else None

    def is_table(self, md5: str) -> bool:
        entry = self.entry(md5)
        return bool(entry and entry["kind"] == "table")

    def holds(self, md5: str, digests: set[bytes], source: Path | None = None) -> bool:
        """Whether the object is a sample table holding one of the IDs ``digests`` name (``id_digests``).

        A table's IDs are read once per digest (``source`` as in ``entry``) and kept in the memo: a table whose
        bytes did not change is never read again, whoever asks."""
        entry = self.entry(md5, source)
        if not entry or entry["kind"] != "table":
            return False
        if "ids" not in entry:
            self.read_ids([(md5, source)])
            if "ids" not in entry:  # gone from every store since it was classified: nothing left to delete
                return False
        if not digests:
            return False
        held = np.frombuffer(base64.b64decode(entry["ids"]), dtype=ID_DIGEST)
        # kind="sort": the digests span all 64 bits, too wide for numpy's lookup-table method
        return bool(np.isin(held, np.frombuffer(b"".join(digests), dtype=ID_DIGEST), kind="sort").any())

    def read_ids(self, objects: Iterable[tuple[str, Path | None]]) -> None:
        """Read and keep the IDs of every sample table among ``objects`` (md5, ``source`` as in ``entry``) whose IDs
        the memo does not hold yet, in passes of up to ``BATCH_IDS`` IDs: within a pass an ID found in several tables
        is hashed once. (A forget's tables repeat their IDs: each kept sample of a changed partition is in its encoded
        partition, k shards and the routing index; at 100 samples of 280k that is 1.9 M IDs, 0.2 M distinct.) The
        bound keeps memory flat when the memo is cold and the purge meets a long history's tables."""
        pending: list[tuple[str, dict[str, Any], pa.ChunkedArray]] = []
        seen: set[str] = set()
        count = 0
        for md5, source in objects:
            entry = self.entry(md5, source)
            if md5 not in seen and entry and entry["kind"] == "table" and "ids" not in entry \
                    and (content := self._content(md5, source)) is not None:
                seen.add(md5)
                pending.append((md5, entry, _text(pq.read_table(_source(content), columns=["sample_id"]).column(0))))
                count += len(pending[-1][2])
                if count >= BATCH_IDS:
                    self._keep(pending)
                    pending, count = [], 0
        if pending:
            self._keep(pending)

    def _keep(self, tables: list[tuple[str, dict[str, Any], pa.ChunkedArray]]) -> None:
        """Digest the ID columns of ``tables`` (md5, memo entry, IDs as text), each distinct ID once (Arrow's
        dictionary encoding, in C), and write each table's sorted digests to its memo entry."""
        encoded = pa.chunked_array([c for *_, ids in tables for c in ids.chunks], pa.large_string())
        encoded = encoded.dictionary_encode().combine_chunks()
        digests = np.frombuffer(b"".join(self._digests(encoded.dictionary.to_pylist())), dtype=">u8")
        positions = encoded.indices.to_numpy()
        start = 0
        for md5, entry, ids in tables:
            # sorted unique big-endian integers: the bytes of the sorted digests, as the memo has always held them
            held = np.unique(digests[positions[start:start + len(ids)]])
            start += len(ids)
            entry["ids"] = base64.b64encode(held.tobytes()).decode()
            self.write(self.folder / md5, json.dumps(entry).encode())
            self.tables_read += 1

    def drop(self, digests: Iterable[str]) -> None:
        """Forget what purged sample tables held (their IDs leave the memo with them); listings stay, so a later
        forget still knows the files of a directory whose listing is gone."""
        for md5 in digests:
            if valid_digest(md5) and not md5.endswith(DIR_SUFFIX):
                (self.folder / md5).unlink(missing_ok=True)
                self._entries.pop(md5, None)


def _text(ids: pa.ChunkedArray) -> pa.ChunkedArray:
    """A ``sample_id`` column as text, each value as ``str`` writes it: the form a manifest's IDs are digested in
    (``ObjectIndex.id_digests``), numeric IDs and nulls included."""
    if (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)) and not ids.null_count:
        return ids.cast(pa.large_string())
    return pa.chunked_array([pa.array([str(i) for i in ids.to_pylist()], pa.large_string())])


def _source(content: Path | bytes) -> Any:
    return content if isinstance(content, Path) else pa.BufferReader(content)


def plan_purge(root: Path, sample_ids: Iterable[str], before: Iterable[str]) -> dict[str, list[str]]:
    """The digests a forget of ``sample_ids`` deletes, by kind: ``superseded``, the versions of the outputs it
    replaced (``before``: dvc.lock's and the .dvc files' digests before the forget, listings expanded), and
    ``history``, every other object of the project's history derived from a forgotten sample. Never an object
    the workspace references."""
    return plan_keyed_purge(root, ObjectIndex(root, None).id_digests(sample_ids), before)


def plan_keyed_purge(root: Path, keyed_ids: set[bytes], before: Iterable[str]) -> dict[str, list[str]]:
    """``plan_purge`` for the forgotten IDs in keyed form (``ObjectIndex.id_digests``): what a purge a store
    refused keeps, outside the journal, to find its objects later without the raw IDs."""
    stores = Stores(root)
    index = ObjectIndex(root, stores)
    keep = referenced_objects(root, stores.cache)
    superseded = expand_dirs(stores.cache, set(before)) - keep  # before the purge: their listings are there
    history = doomed_objects(index, history_runs(root, stores.cache, index), keyed_ids, keep, superseded)
    return {"superseded": sorted(superseded), "history": sorted(history)}


def history_objects(root: Path) -> set[str]:
    """Every object the project's history and workspace reference (files of directory outputs included): what
    `legonet audit verify` scans for forgotten IDs in a store other projects may share."""
    stores = Stores(root)
    index = ObjectIndex(root, stores)
    written = {o for _, outs in history_runs(root, stores.cache, index, remembered=False) for o in outs}
    return written | referenced_objects(root, stores.cache)


def purged(root: Path, doomed: dict[str, list[str]], request_ids: list[str]) -> None:
    """After the purge: remember which requests purged each digest (`legonet status`, `legonet audit verify`),
    and drop what the purged tables held from the memo."""
    digests = {d for kind in doomed.values() for d in kind}
    record_purged(root, digests, request_ids)
    ObjectIndex(root, None).drop(digests)


def doomed_objects(index: ObjectIndex, runs: set[Run], keyed_ids: set[bytes], keep: set[str], superseded: set[str]
                   ) -> set[str]:
    """The objects the ``runs`` wrote, beyond ``superseded`` (doomed already), derived from a forgotten sample by
    the rule of this module; never one of ``keep``.

    An object is derived through its runs only when every run that wrote it read a doomed object: the same bytes
    written by a run that never saw the sample carry nothing of it (the package's copy of the encoder, the
    keys, or of an adapter a forget did not touch; the code files every package holds).

    An object an earlier forget purged (``index.gone``) is decided: it is neither doomed nor counted again (its
    request is on record in the purged map), and it dooms nothing further (what was derived from it alone was
    purged with it). Only the runs that wrote an undecided object enter the fixpoint."""
    producers: dict[str, list[Run]] = {}
    for run in runs:
        for out in run[1]:
            producers.setdefault(out, []).append(run)
    doomed = set(superseded)
    open_files = {o for o in producers if not o.endswith(DIR_SUFFIX)} - keep - doomed - index.gone
    index.read_ids((o, None) for o in open_files)  # the ones not read yet, in one pass
    doomed |= {o for o in open_files if index.holds(o, keyed_ids)}
    relevant = {run for out in open_files for run in producers[out]}
    changed = True
    while changed:  # to a fixpoint: the doomed set only grows, so which runs read a doomed object only grows
        changed = False
        tainted = {run: any(not index.is_table(d) for d in read) for run in relevant
                   if (read := run[0] & doomed)}  # run -> whether a doomed input was not a sample table
        for out in open_files - doomed:
            made = producers[out]
            if all(run in tainted for run in made) and (not index.is_table(out) or all(tainted[run] for run in made)):
                doomed.add(out)
                changed = True
    for listing in {o for o in producers if o.endswith(DIR_SUFFIX)} - keep - doomed - index.gone:
        if any(md5 in doomed for _, md5 in index.listing(listing) or []):
            doomed.add(listing)
    return doomed - superseded - keep


def history_runs(root: Path, cache: Path, index: ObjectIndex, remembered: bool = True) -> set[Run]:
    """Every distinct stage run the history records (git, then the run-cache), its objects resolved to files.
    A run-cache entry names its folder deps by digests no store holds; the git history resolved them.

    ``remembered``: documents (a git blob, a run-cache entry: neither ever changes) whose runs the memo holds are
    not read again, and runs that wrote only objects a forget purged are dropped from it (a purged object is
    decided, so such a run has nothing left to decide), so a forget reads only the history added since the last
    one. `legonet audit verify` passes False: it trusts no memo and reads the whole history."""
    memo = _HistoryMemo.load(index) if remembered else _HistoryMemo()
    blobs, entries = _git_blobs(root), _run_cache_entries(cache)
    documents = [*blobs, *(f"runs/{entry.relative_to(cache / 'runs').as_posix()}" for entry in entries)]
    if not memo.documents <= set(documents):  # history was rewritten (a branch deleted, commits dropped): read it all
        memo = _HistoryMemo()
    new = [d for d in documents if d not in memo.documents]
    unresolved: set[Run] = set()  # runs of documents read again next time: not kept
    if new:
        fresh = set(new)
        stages = _git_stages(root, [b for b in blobs if b in fresh])
        stages.update({d: _stages(read_yaml(path)) for d, path in zip(documents[len(blobs):], entries, strict=True)
                       if d in fresh})
        for document in new:
            runs, resolved = _document_runs(stages.get(document, []), index, memo.composed)
            if resolved:
                memo.runs |= runs
                memo.documents.add(document)
            else:  # a folder or listing not yet known (the run-cache entry of a run not yet committed)
                unresolved |= runs
    if remembered:
        memo.settle(index)
    return memo.runs | unresolved


MEMO_FILE = "history.json"  # the runs of the documents read so far (``_HistoryMemo``)


class _HistoryMemo:
    """What the history read so far holds: the documents read (git blob ids, run-cache entry paths), the distinct
    runs they record, and the files of each folder digest a dep names (``_document_runs``). Kept in the object
    memo; a torn, damaged or older file is read as empty (the history is read again)."""

    VERSION = 1

    def __init__(self, documents: set[str] | None = None, runs: set[Run] | None = None,
                 composed: dict[str, frozenset[str]] | None = None) -> None:
        self.documents = documents or set()
        self.runs = runs or set()
        self.composed = composed or {}
        self._saved: bytes | None = None

    @classmethod
    def load(cls, index: ObjectIndex) -> _HistoryMemo:
        path = index.folder / MEMO_FILE
        try:
            saved = path.read_bytes() if path.is_file() else b"{}"
            data = json.loads(saved)
            if data.get("version") != cls.VERSION:
                return cls()
            memo = cls(set(data["documents"]), {(frozenset(r), frozenset(w)) for r, w in data["runs"]},
                       {md5: frozenset(files) for md5, files in data["composed"].items()})
        except (ValueError, KeyError, TypeError, AttributeError):  # not the memo this code writes
            return cls()
        memo._saved = saved
        return memo

    def settle(self, index: ObjectIndex) -> None:
        """Drop the runs whose every output a forget purged, and write the memo if it changed. Such a run wrote
        nothing left to delete; were its bytes written again, their newer run decides (``doomed_objects``)."""
        self.runs = {run for run in self.runs if not run[1] <= index.gone}
        data = json.dumps({"version": self.VERSION, "documents": sorted(self.documents),
                           "runs": sorted([sorted(r), sorted(w)] for r, w in self.runs),
                           "composed": {md5: sorted(files) for md5, files in sorted(self.composed.items())}}).encode()
        if data != self._saved:
            index.write(index.folder / MEMO_FILE, data)
            self._saved = data


Stage = tuple[list[tuple[str, str]], list[tuple[str, str]]]  # the (path, md5) deps and outs of one stage entry


def _git_blobs(root: Path) -> list[str]:
    """The ids of the ``dvc.lock`` and ``.dvc`` blobs of every commit reachable from any ref, each once."""
    listed = subprocess.run(["git", "rev-list", "--all", "--objects"], cwd=root, capture_output=True)
    if listed.returncode != 0:  # not a git repository, or no commit yet: no history beyond the workspace
        return []
    blobs: dict[str, None] = {}
    for line in listed.stdout.decode(errors="replace").splitlines():
        sha, _, path = line.partition(" ")
        name = path.rsplit("/", 1)[-1]
        if name == "dvc.lock" or (name.endswith(".dvc") and name != ".dvc" and ".dvc" not in path.split("/")[:-1]):
            blobs[sha] = None
    return list(blobs)


def _git_stages(root: Path, blobs: list[str]) -> dict[str, list[Stage]]:
    """The stage entries of each git blob, read with one `git cat-file --batch`."""
    if not blobs:
        return {}
    batch = subprocess.run(["git", "cat-file", "--batch"], cwd=root, input="\n".join(blobs).encode() + b"\n",
                           capture_output=True, check=True).stdout
    parsed: dict[str, list[Stage]] = {}
    at, loader = 0, getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    while at < len(batch):
        end = batch.index(b"\n", at)
        header = batch[at:end].split()
        if len(header) < 3:  # "<sha> missing"
            at = end + 1
            continue
        size = int(header[2])
        body = batch[end + 1:end + 1 + size]
        at = end + 1 + size + 1
        try:
            parsed[header[0].decode()] = _stages(yaml.load(body, Loader=loader)) if header[1] == b"blob" else []
        except yaml.YAMLError:  # a broken file in an old commit: DVC could not use it either
            parsed[header[0].decode()] = []
    return parsed


def _run_cache_entries(cache: Path) -> list[Path]:
    """DVC's run-cache entries (``<cache>/runs/ab/<key>/<value>``), each the lock entry of one stage run; an entry
    is named by the hash of its content, so it never changes."""
    folder = cache / "runs"
    return [path for path in sorted(folder.glob("*/*/*")) if path.is_file()] if folder.is_dir() else []


def _stages(document: Any) -> list[Stage]:
    """(deps, outs) of each stage entry of a ``dvc.lock``, or of the one entry of a ``.dvc`` file or a run-cache
    entry; entries whose digest is not an md5 are dropped."""
    if not isinstance(document, dict):
        return []
    if isinstance(document.get("stages"), dict):  # dvc.lock
        stages = [s for s in document["stages"].values() if isinstance(s, dict)]
    else:
        stages = [document] if "outs" in document else []
    return [(_entries(stage, "deps"), _entries(stage, "outs")) for stage in stages]


def _entries(stage: dict[str, Any], field: str) -> list[tuple[str, str]]:
    items = stage.get(field)
    return [(str(e.get("path", "")).strip("/"), e["md5"]) for e in (items if isinstance(items, list) else [])
            if isinstance(e, dict) and valid_digest(e.get("md5"))]


def _document_runs(stages: list[Stage], index: ObjectIndex, composed: dict[str, frozenset[str]]
                   ) -> tuple[set[Run], bool]:
    """The runs of one document, each dep resolved to the file objects under its path: a dep on a folder inside
    a directory output (``data/shards/block-0000``) or on a folder made of several outputs (``models/adapters``)
    has a digest DVC computes but never stores, so its files come from the outputs that wrote them (``composed``:
    by that digest, from this document or one read before). Also whether every folder was resolved to its files
    or was purged (a listing no store holds yet, a folder no document read so far wrote, is not)."""
    files: dict[str, str] = {}  # path -> file md5 of everything this document's runs wrote
    outputs: list[tuple[list[tuple[str, str]], set[str]]] = []
    resolved = True
    for deps, outs in stages:
        written: set[str] = set()
        for path, md5 in outs:
            written.add(md5)
            expanded = _expand(path, md5, index)
            resolved &= expanded is not None or md5 in index.gone
            for rel, digest in expanded or [(path, md5)]:
                files[rel] = digest
                written.add(digest)
        outputs.append((deps, written))
    paths = sorted(files)
    runs = set()
    for deps, written in outputs:
        read: set[str] = set()
        for path, md5 in deps:
            at = bisect.bisect_left(paths, path)
            inside = []
            while at < len(paths) and (paths[at] == path or paths[at].startswith(path + "/")):
                inside.append(files[paths[at]])
                at += 1
            if inside:
                composed[md5] = frozenset(inside)
            found = inside or composed.get(md5) or {digest for _, digest in _expand(path, md5, index) or []}
            resolved &= bool(found) or md5 in index.gone
            read.update(found or {md5})
        runs.add((frozenset(read), frozenset(written)))
    return runs, resolved


def _expand(path: str, md5: str, index: ObjectIndex) -> list[tuple[str, str]] | None:
    """(path, md5) of the files an output or dep names: the listing's files for a directory, else itself; None
    for a directory whose listing no store holds."""
    if md5.endswith(DIR_SUFFIX):
        listing = index.listing(md5)
        return None if listing is None else [(f"{path}/{rel}", digest) for rel, digest in listing]
    return [(path, md5)]


def purged_outputs(root: Path) -> list[str]:
    """For `legonet status`: each output of the checked-out commit whose object a forget purged, with the
    request, so an old commit says why `dvc checkout`/`dvc pull` cannot restore it."""
    known = purged_map(root)
    if not known:
        return []
    stores = Stores(root)
    index = ObjectIndex(root, stores)
    lines = []
    for path, md5 in sorted(set(workspace_outputs(root))):
        files = [(path, md5), *(_expand(path, md5, index) or [])]
        gone = sorted({r for _, digest in files for r in known.get(digest, [])
                       if not object_path(stores.cache, digest).exists()})
        if gone:
            lines.append(f"{path}: purged by request {', '.join(gone)} (its data held or was derived from a "
                         "forgotten sample; this commit cannot be restored)")
    return lines
