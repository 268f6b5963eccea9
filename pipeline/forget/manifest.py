"""Deletion-request manifests: read one file, validate all of it, return its fields (pipeline.forget.requests
makes them a request).

``legonet forget`` must not touch a single artifact before the whole request is known to be well formed
(docs/design.md section 5, step 1), so every rule is checked here, at the boundary, and the first failure raises
``ManifestError`` with one line that names the file, what is wrong and how to fix it.

A manifest holds four fields, all required, no others allowed:

* ``request_id``: ``[A-Za-z0-9._-]{1,128}``; it names the audit record file, so it must be filename-safe.
* ``sample_ids``: 1 to 1,000,000 distinct sample IDs. A sample ID follows the same rule as in the data
  (``SAMPLE_ID_PATTERN``: a letter or digit, then up to 255 letters, digits and ``._:@+=-``). Paths, padded
  or empty strings and control characters get a specific message, because they are the usual mistakes
  (pasting a file name, a trailing space from a spreadsheet).
* ``reason``: free text, not blank (it goes into the audit record).
* ``received_at``: ISO 8601 date or date-time as accepted by ``datetime.fromisoformat`` (e.g.
  ``2024-05-01T09:30:00Z``). The string is kept as written; an unquoted YAML timestamp, which YAML parses
  into a datetime, is turned back into ISO text with ``isoformat()``.

Formats, chosen by extension:

* ``.json``: one object with the four keys. Duplicate keys are an error (the standard parser would silently
  keep the last one and drop IDs).
* ``.yaml`` / ``.yml``: the same mapping, read with a safe loader that also rejects duplicate keys. Values
  YAML would turn into numbers (``- 42``) are type errors: quote them.
* ``.csv``: a header row, then one row per sample. Column ``sample_id`` holds one ID per row; columns
  ``request_id``, ``reason`` and ``received_at`` are also required, and every non-empty cell of each must
  hold the same value (fill it on every row, or only on the first and leave the rest empty). One file is one
  request: differing values are an error, so two requests cannot be merged by accident. Blank lines are
  skipped.

A UTF-8 byte-order mark (as written by spreadsheet programs) is accepted in every format.
``pipeline/schemas/manifest.schema.json`` publishes the JSON/YAML form as a JSON Schema (draft 2020-12); the
test suite checks that it agrees with the rules here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, NoReturn

import yaml

from pipeline.data.ids import REQUEST_ID_PATTERN, sample_id_problem, show
from pipeline.errors import ManifestError

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
MAX_SAMPLE_IDS = 1_000_000
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # a million IDs of typical length fit many times over
FIELDS = ("request_id", "sample_ids", "reason", "received_at")
_CSV_ID_COLUMN = "sample_id"
_CSV_COLUMNS = (_CSV_ID_COLUMN, "request_id", "reason", "received_at")
_SHOWN = 5  # how many offending IDs an error message names


@dataclass(frozen=True)
class _Parsed:
    """What a format parser hands to the common validation: the fields, and where each sample ID came from."""

    fields: dict[Any, Any]
    id_locations: Sequence[str] | None  # e.g. "line 7" for CSV; None means "sample_ids[i]"


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and fully validate one manifest: its four fields (``sample_ids`` a tuple) and ``digest``, the SHA-256
    of the file's bytes, for the audit; raise ``ManifestError`` on the first problem."""
    path = Path(path)
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        _fail(path, f"unsupported extension {path.suffix!r}; name the manifest *.json, *.yaml/*.yml or *.csv")
    data = _read_regular(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _fail(path, f"is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8")
    parsed = parser(path, text)
    return _validate(path, parsed, hashlib.sha256(data).hexdigest())


def _read_regular(path: Path) -> bytes:
    """The file's bytes, refusing at once what is not a regular file of at most ``MAX_MANIFEST_BYTES``: a FIFO or
    a device (``/dev/zero`` behind a link) would block or never end, and size is checked before reading."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting
    except FileNotFoundError:
        _fail(path, "no such file; check the path")
    except OSError as exc:
        _fail(path, f"cannot be read: {exc.strerror}; check the path and its permissions")
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        if stat.S_ISDIR(info.st_mode):
            _fail(path, "is a directory; pass the manifest file itself")
        _fail(path, "is not a regular file (a FIFO, socket or device); pass the manifest file itself")
    with os.fdopen(descriptor, "rb") as handle:
        if info.st_size > MAX_MANIFEST_BYTES:
            _fail(path, f"is {info.st_size:,} bytes, more than {MAX_MANIFEST_BYTES:,}; split it into more files")
        return handle.read(MAX_MANIFEST_BYTES + 1)


def _fail(path: Path, message: str) -> NoReturn:
    raise ManifestError(f"{path}: {message}")


def _shown(values: Sequence[str]) -> str:
    rest = len(values) - _SHOWN
    return ", ".join(show(v) for v in values[:_SHOWN]) + (f" (and {rest} more)" if rest > 0 else "")


# --- parsers: text -> _Parsed, raising ManifestError with the parser's line number ---


def _parse_json(path: Path, text: str) -> _Parsed:
    try:
        fields = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(path, pairs))
    except json.JSONDecodeError as exc:
        _fail(path, f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
    except RecursionError:
        _fail(path, "JSON nested too deeply; a manifest is one flat object with a list of IDs")
    except ValueError as exc:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
        _fail(path, f"malformed JSON: {exc}; sample IDs and the other fields are strings (quote them)")
    return _Parsed(_mapping(path, fields), None)


def _unique_keys(path: Path, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    duplicated = sorted(str(key) for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    if duplicated:
        _fail(path, f"duplicate key(s) {_shown(duplicated)}; give each key once")
    return dict(pairs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate mapping keys instead of keeping the last one, and aliases.

    A manifest is one flat mapping and has no use for anchors; nested aliases expand exponentially (a few hundred
    bytes exhaust memory: the "billion laughs"), so an alias is refused where it appears, before any expansion.
    """

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a manifest "
                                              "(write each value out)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                break  # the base class reports unhashable keys with their position
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path, text: str) -> _Parsed:
    try:
        fields = yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        _fail(path, f"malformed YAML{where}: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        _fail(path, f"malformed YAML: {exc}")
    except RecursionError:
        _fail(path, "YAML nested too deeply; a manifest is one flat mapping with a list of IDs")
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        _fail(path, f"malformed YAML: {exc}; sample IDs and the other fields are strings (quote them)")
    fields = _mapping(path, fields)
    if isinstance(fields.get("received_at"), date):  # unquoted: YAML already parsed it as an ISO 8601 time
        fields["received_at"] = fields["received_at"].isoformat()
    return _Parsed(fields, None)


def _mapping(path: Path, value: object) -> dict[Any, Any]:
    if value is None:
        _fail(path, f"is empty; it needs the keys {', '.join(FIELDS)}")
    if not isinstance(value, dict):
        _fail(path, f"top level is a {type(value).__name__}, not a mapping with keys {', '.join(FIELDS)}")
    return value


def _parse_csv(path: Path, text: str) -> _Parsed:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            _fail(path, f"is empty; it needs a header row with columns {', '.join(_CSV_COLUMNS)}")
        _check_header(path, header)
        rows: list[tuple[int, list[str]]] = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                _fail(path, f"line {reader.line_num} has {len(row)} field(s), the header has {len(header)}; "
                            "fix the row (quote values that contain commas)")
            rows.append((reader.line_num, row))
        if not rows:
            _fail(path, "has a header but no rows; add one row per sample ID to forget")
    except csv.Error as exc:
        _fail(path, f"malformed CSV at line {reader.line_num}: {exc}")
    columns = {name: [(line, row[index]) for line, row in rows] for index, name in enumerate(header)}
    fields: dict[str, object] = {"sample_ids": [value for _, value in columns[_CSV_ID_COLUMN]]}
    for name in _CSV_COLUMNS[1:]:
        fields[name] = _constant_column(path, name, columns[name])
    return _Parsed(fields, [f"line {line}" for line, _ in columns[_CSV_ID_COLUMN]])


def _check_header(path: Path, header: list[str]) -> None:
    duplicated = sorted({name for name, count in Counter(header).items() if count > 1})
    if duplicated:
        _fail(path, f"duplicate column(s) {_shown(duplicated)} in the header; give each column once")
    unknown = [name for name in header if name not in _CSV_COLUMNS]
    if unknown:
        _fail(path, f"unknown column(s) {_shown(unknown)}; the columns are {', '.join(_CSV_COLUMNS)}")
    missing = [name for name in _CSV_COLUMNS if name not in header]
    if missing:
        _fail(path, f"missing column(s) {', '.join(missing)}; the columns are {', '.join(_CSV_COLUMNS)}")


def _constant_column(path: Path, name: str, cells: list[tuple[int, str]]) -> str:
    """The one value of a per-request column: every non-empty cell must hold it."""
    filled = [(line, value) for line, value in cells if value != ""]
    if not filled:
        _fail(path, f"column {name} is empty; write the request's {name} on (at least) the first row")
    first_line, first = filled[0]
    for line, value in filled:
        if value != first:
            _fail(path, f"column {name} differs between line {first_line} ({show(first)}) and line {line} "
                        f"({show(value)}); one manifest is one request: write one file per request")
    return first


_PARSERS: dict[str, Callable[[Path, str], _Parsed]] = {
    ".json": _parse_json,
    ".yaml": _parse_yaml,
    ".yml": _parse_yaml,
    ".csv": _parse_csv,
}


# --- validation common to all formats ---


def _validate(path: Path, parsed: _Parsed, digest: str) -> dict[str, Any]:
    fields = parsed.fields
    unknown = sorted(str(key) for key in fields if key not in FIELDS)
    if unknown:
        _fail(path, f"unknown key(s) {_shown(unknown)}; a manifest has exactly {', '.join(FIELDS)}")
    missing = [key for key in FIELDS if key not in fields]
    if missing:
        _fail(path, f"missing key(s) {', '.join(missing)}; a manifest has exactly {', '.join(FIELDS)}")
    request_id = _string(path, fields, "request_id")
    if not _REQUEST_ID.fullmatch(request_id):
        _fail(path, f"request_id {show(request_id)} must be 1 to 128 characters of letters, digits and ._- "
                    "(it names the audit record file)")
    reason = _string(path, fields, "reason")
    if not reason.strip():
        _fail(path, "reason is blank; say why the samples are forgotten (e.g. 'GDPR Art. 17 request')")
    received_at = _string(path, fields, "received_at")
    try:
        datetime.fromisoformat(received_at)
    except ValueError:
        _fail(path, f"received_at {show(received_at)} is not an ISO 8601 date or date-time; "
                    "write e.g. '2024-05-01T09:30:00Z'")
    sample_ids = _sample_ids(path, fields["sample_ids"], parsed.id_locations)
    return {"request_id": request_id, "sample_ids": sample_ids, "reason": reason, "received_at": received_at,
            "digest": digest}


def _string(path: Path, fields: dict[Any, Any], key: str) -> str:
    value = fields[key]
    if not isinstance(value, str):
        _fail(path, f"{key} must be a string, got {type(value).__name__} {show(value)} (quote it)")
    return value


def _sample_ids(path: Path, value: object, locations: Sequence[str] | None) -> tuple[str, ...]:
    if not isinstance(value, list):
        _fail(path, f"sample_ids must be a list of sample IDs, got {type(value).__name__}")
    if not value:
        _fail(path, "sample_ids is empty; list at least one sample ID to forget")
    if len(value) > MAX_SAMPLE_IDS:
        _fail(path, f"has {len(value):,} sample IDs, more than {MAX_SAMPLE_IDS:,}; split it into more files")
    for index, sample_id in enumerate(value):
        problem = sample_id_problem(sample_id)
        if problem:
            where = locations[index] if locations is not None else f"sample_ids[{index}]"
            _fail(path, f"sample ID at {where} {problem}")
    duplicated = sorted(sample_id for sample_id, count in Counter(value).items() if count > 1)
    if duplicated:
        _fail(path, f"duplicate sample ID(s) {_shown(duplicated)}; list each sample once")
    return tuple(value)
