"""Manifest loading: every format, every rule, and agreement with the published JSON Schema."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from importlib import resources
from pathlib import Path

import pytest
import yaml

import pipeline.forget.manifest as manifest_module
from pipeline.data.ids import REQUEST_ID_PATTERN, SAMPLE_ID_PATTERN, sample_id_problem
from pipeline.errors import ManifestError
from pipeline.forget.manifest import FIELDS, MAX_SAMPLE_IDS
from pipeline.forget.requests import DeletionRequest, load_manifest, merge_requests

GOOD = {
    "request_id": "req-2024.05_01",
    "sample_ids": ["mnist-00042", "mnist-01337"],
    "reason": "GDPR Art. 17 request",
    "received_at": "2024-05-01T09:30:00Z",
}


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, manifest: object, name: str = "m.json") -> Path:
    return write(tmp_path, name, json.dumps(manifest))


def with_(**changes: object) -> dict[str, object]:
    return {**GOOD, **changes}


def error_of(path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # names the file
    assert "\n" not in message, message  # one line
    return message


@pytest.fixture()
def schema() -> dict:
    text = resources.files("pipeline").joinpath("schemas/manifest.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


# --- formats ---


def test_json_loads_and_digests_file_bytes(tmp_path: Path) -> None:
    path = write_json(tmp_path, GOOD)
    request = load_manifest(path)
    assert request == DeletionRequest(
        request_id="req-2024.05_01",
        sample_ids=("mnist-00042", "mnist-01337"),
        reason="GDPR Art. 17 request",
        received_at="2024-05-01T09:30:00Z",
        source=path,
        digest=hashlib.sha256(path.read_bytes()).hexdigest(),
    )


def test_yaml_and_yml_load_the_same_request(tmp_path: Path) -> None:
    text = yaml.safe_dump(GOOD)
    for name in ("m.yaml", "m.YML"):
        request = load_manifest(write(tmp_path, name, text))
        assert (request.request_id, request.sample_ids, request.reason, request.received_at) == (
            GOOD["request_id"], tuple(GOOD["sample_ids"]), GOOD["reason"], GOOD["received_at"])


def test_yaml_unquoted_timestamp_becomes_iso_text(tmp_path: Path) -> None:
    head = "request_id: r1\nsample_ids: [a1]\nreason: x\n"
    path = write(tmp_path, "m.yaml", head + "received_at: 2024-05-01 09:30:00Z\n")
    assert load_manifest(path).received_at == "2024-05-01T09:30:00+00:00"
    path = write(tmp_path, "d.yaml", head + "received_at: 2024-05-01\n")
    assert load_manifest(path).received_at == "2024-05-01"


def test_csv_value_on_every_row_or_only_the_first(tmp_path: Path) -> None:
    every = "sample_id,request_id,reason,received_at\nmnist-1,r1,why,2024-05-01\nmnist-2,r1,why,2024-05-01\n"
    first = "request_id,sample_id,reason,received_at\r\nr1,mnist-1,why,2024-05-01\r\n\r\n,mnist-2,,\r\n"
    for name, text in (("every.csv", every), ("first.csv", first)):
        request = load_manifest(write(tmp_path, name, text))
        assert request.sample_ids == ("mnist-1", "mnist-2")
        assert (request.request_id, request.reason, request.received_at) == ("r1", "why", "2024-05-01")


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    csv_text = "sample_id,request_id,reason,received_at\nmnist-1,r1,why,2024-05-01\n"
    assert load_manifest(write(tmp_path, "m.csv", bom + csv_text.encode())).sample_ids == ("mnist-1",)
    as_json = write(tmp_path, "m.json", bom + json.dumps(GOOD).encode())
    assert load_manifest(as_json).sample_ids == tuple(GOOD["sample_ids"])


# --- file-level failures ---


def test_missing_file_directory_and_extension(tmp_path: Path) -> None:
    assert "no such file" in error_of(tmp_path / "absent.json")
    (tmp_path / "dir.json").mkdir()
    assert "is a directory" in error_of(tmp_path / "dir.json")
    assert "unsupported extension '.txt'" in error_of(write(tmp_path, "m.txt", "x"))


def test_fifos_and_devices_are_refused_at_once(tmp_path: Path) -> None:
    """Reading a FIFO waits for a writer and /dev/zero never ends: both are refused before any read."""
    os.mkfifo(tmp_path / "pipe.json")
    assert "not a regular file (a FIFO, socket or device)" in error_of(tmp_path / "pipe.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    assert "not a regular file (a FIFO, socket or device)" in error_of(tmp_path / "zero.json")


def test_byte_size_cap_is_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_json(tmp_path, GOOD)
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", path.stat().st_size - 1)
    assert f"is {path.stat().st_size:,} bytes, more than" in error_of(path)
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", path.stat().st_size)
    assert load_manifest(path).request_id == GOOD["request_id"]


@pytest.mark.parametrize(("name", "text"), [("deep.json", "[" * 100_000 + "]" * 100_000),
                                            ("deep.yaml", "[" * 100_000 + "]" * 100_000)])
def test_deep_nesting_is_an_error_not_a_traceback(tmp_path: Path, name: str, text: str) -> None:
    assert "nested too deeply" in error_of(write(tmp_path, name, text))


def test_yaml_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    """Nested anchors ("billion laughs"): 9 levels of 9 aliases would expand to 9**9 strings; refused at once."""
    levels = ["a0: &a0 [mnist-00042]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = "\n".join([*levels, "request_id: r1", "sample_ids: *a9", "reason: x", "received_at: '2024-05-01'"])
    started = time.monotonic()
    message = error_of(write(tmp_path, "laughs.yaml", text))
    assert "alias *a0 is not allowed in a manifest" in message and "line 2" in message, message
    assert time.monotonic() - started < 5  # refused while parsing, not after an exponential expansion


@pytest.mark.parametrize("name", ["m.json", "m.yaml"])
def test_an_integer_too_long_to_convert_is_an_error_not_a_traceback(tmp_path: Path, name: str) -> None:
    digits = "7" * 5000
    text = (f'{{"request_id": "r1", "sample_ids": [{digits}], "reason": "x", "received_at": "2024-05-01"}}'
            if name.endswith(".json") else f"request_id: r1\nsample_ids: [{digits}]\nreason: x\n")
    message = error_of(write(tmp_path, name, text))
    assert message.startswith(f"{tmp_path / name}: malformed") and "quote them" in message, message


def test_unreadable_file(tmp_path: Path) -> None:
    under_a_file = write_json(tmp_path, GOOD) / "m.json"
    assert "cannot be read: Not a directory" in error_of(under_a_file)


def test_not_utf8(tmp_path: Path) -> None:
    assert "not UTF-8" in error_of(write(tmp_path, "m.json", b'{"reason": "\xff"}'))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("m.json", '{\n  "request_id": "r1",\n  "sample_ids": [\n}', "malformed JSON at line 4"),
        ("m.yaml", "request_id: r1\nsample_ids: [a1\nreason: x\n", "malformed YAML at line"),
        ("m.yaml", "request_id: r1\nrequest_id: r2\n", "malformed YAML at line 2, column 1: duplicate key"),
        ("m.yaml", "---\na: 1\n---\nb: 2\n", "malformed YAML at line 3"),
        ("m.csv", 'sample_id,request_id,reason,received_at\nmnist-1,r1,"why,2024-05-01\n', "malformed CSV"),
        ("m.csv", "sample_id,request_id,reason,received_at\nmnist-1,r1,why\n", "line 2 has 3 field(s)"),
    ],
)
def test_malformed_files_report_the_line(tmp_path: Path, name: str, text: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path, name, text))


def test_json_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    text = '{"request_id": "r1", "sample_ids": ["a1"], "sample_ids": ["a2"], "reason": "x", "received_at": 1}'
    assert "duplicate key(s) 'sample_ids'" in error_of(write(tmp_path, "m.json", text))


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("m.json", "[1, 2]", "top level is a list, not a mapping"),
        ("m.yaml", "- a\n- b\n", "top level is a list, not a mapping"),
        ("m.yaml", "", "is empty; it needs the keys request_id, sample_ids, reason, received_at"),
        ("m.yaml", "? [a]\n: 1\n", "malformed YAML at line 1"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, name: str, text: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path, name, text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty; it needs a header row"),
        ("sample_id,request_id,reason,received_at,note\n", "unknown column(s) 'note'"),
        ("sample_id,request_id,reason\n", "missing column(s) received_at"),
        ("sample_id,sample_id,request_id,reason,received_at\n", "duplicate column(s) 'sample_id'"),
        ("sample_id,request_id,reason,received_at\n", "has a header but no rows"),
        ("sample_id,request_id,reason,received_at\na1,r1,why,2024-05-01\na2,r2,why,2024-05-01\n",
         "column request_id differs between line 2 ('r1') and line 3 ('r2')"),
        ("sample_id,request_id,reason,received_at\na1,r1,,2024-05-01\n", "column reason is empty"),
        ("sample_id,request_id,reason,received_at\na1,r1,why,2024-05-01\n,r1,why,2024-05-01\n",
         "sample ID at line 3 is empty"),
    ],
)
def test_csv_structure(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path, "m.csv", text))


# --- field rules ---


def test_unknown_and_missing_keys(tmp_path: Path) -> None:
    assert "unknown key(s) 'note'" in error_of(write_json(tmp_path, with_(note="hi")))
    partial = {key: value for key, value in GOOD.items() if key not in ("reason", "received_at")}
    assert "missing key(s) reason, received_at" in error_of(write_json(tmp_path, partial))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"request_id": 7}, "request_id must be a string, got int 7"),
        ({"reason": None}, "reason must be a string, got NoneType None"),
        ({"received_at": 20240501}, "received_at must be a string, got int"),
        ({"sample_ids": "mnist-1"}, "sample_ids must be a list of sample IDs, got str"),
        ({"sample_ids": []}, "sample_ids is empty"),
        ({"sample_ids": ["a1", 42]}, "sample ID at sample_ids[1] is int 42, not a string"),
        ({"request_id": "req 1"}, "request_id 'req 1' must be 1 to 128 characters"),
        ({"request_id": ""}, "request_id '' must be"),
        ({"request_id": "r" * 129}, "must be 1 to 128 characters"),
        ({"request_id": "../etc"}, "must be 1 to 128 characters"),
        ({"reason": " \t"}, "reason is blank"),
        ({"received_at": "yesterday"}, "received_at 'yesterday' is not an ISO 8601"),
        ({"received_at": "2024-13-01"}, "is not an ISO 8601"),
    ],
)
def test_field_types_and_values(tmp_path: Path, changes: dict, expected: str) -> None:
    assert expected in error_of(write_json(tmp_path, with_(**changes)))


@pytest.mark.parametrize(
    ("sample_id", "expected"),
    [
        ("", "is empty"),
        (" mnist-1", "leading or trailing whitespace"),
        ("mnist-1\t", "leading or trailing whitespace"),
        ("mnist\x00-1", "control or invisible characters"),
        ("mnist\u200b-1", "control or invisible characters"),
        ("data/raw/x.parquet", "sample IDs are strings like 'mnist-00042', not paths"),
        ("../x", "not paths"),
        ("..", "not paths"),
        ("C:\\data\\x", "not paths"),
        ("~x", "not paths"),
        ("a" * 257, "is 257 characters long"),
        ("mnist 1", "hold only letters, digits and ._:@+=-"),
        ("-mnist", "must start with a letter or digit"),
    ],
)
def test_bad_sample_ids_are_named(tmp_path: Path, sample_id: str, expected: str) -> None:
    message = error_of(write_json(tmp_path, with_(sample_ids=["mnist-0", sample_id])))
    assert "sample ID at sample_ids[1]" in message
    assert expected in message


def test_good_sample_ids() -> None:
    for sample_id in ("mnist-00042", "a", "A1.b_c:d@e+f=g-h", "x.parquet", "9" * 256):
        assert sample_id_problem(sample_id) is None


def test_duplicate_ids_are_named(tmp_path: Path) -> None:
    message = error_of(write_json(tmp_path, with_(sample_ids=["b2", "a1", "b2", "c3", "a1"])))
    assert "duplicate sample ID(s) 'a1', 'b2'" in message


def test_size_limit(tmp_path: Path) -> None:
    ids = [f"s{i}" for i in range(MAX_SAMPLE_IDS + 1)]
    assert "more than 1,000,000" in error_of(write_json(tmp_path, with_(sample_ids=ids)))
    assert len(load_manifest(write_json(tmp_path, with_(sample_ids=ids[:-1]))).sample_ids) == MAX_SAMPLE_IDS


def test_error_messages_stay_short_for_huge_values(tmp_path: Path) -> None:
    assert len(error_of(write_json(tmp_path, with_(sample_ids=["/" * 100_000])))) < 300


# --- merge ---


def test_merge_is_a_sorted_union(tmp_path: Path) -> None:
    first = load_manifest(write_json(tmp_path, with_(request_id="r1", sample_ids=["b", "a"]), "1.json"))
    second = load_manifest(write_json(tmp_path, with_(request_id="r2", sample_ids=["c", "a"]), "2.json"))
    assert merge_requests([first, second]) == ("a", "b", "c")
    assert merge_requests([]) == ()


def test_merge_same_request_id_same_content_is_fine(tmp_path: Path) -> None:
    as_json = load_manifest(write_json(tmp_path, GOOD))
    reordered = with_(sample_ids=GOOD["sample_ids"][::-1])
    as_yaml = load_manifest(write(tmp_path, "m.yaml", yaml.safe_dump(reordered)))
    assert merge_requests([as_json, as_yaml]) == ("mnist-00042", "mnist-01337")


def test_merge_same_request_id_different_content_fails(tmp_path: Path) -> None:
    first = load_manifest(write_json(tmp_path, GOOD, "1.json"))
    second = load_manifest(write_json(tmp_path, with_(sample_ids=["mnist-9"]), "2.json"))
    with pytest.raises(ManifestError, match=r"2\.json: request_id 'req-2024\.05_01' is also used by .*1\.json"
                       r" with different content"):
        merge_requests([first, second])


# --- the published schema agrees with the loader ---


def test_schema_keys_types_and_limits_match(schema: dict) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"]) == set(FIELDS)
    properties = schema["properties"]
    assert {key: properties[key]["type"] for key in FIELDS} == {
        "request_id": "string", "sample_ids": "array", "reason": "string", "received_at": "string"}
    ids = properties["sample_ids"]
    assert (ids["minItems"], ids["maxItems"], ids["uniqueItems"]) == (1, MAX_SAMPLE_IDS, True)
    assert ids["items"] == {"type": "string", "pattern": SAMPLE_ID_PATTERN}
    assert properties["request_id"]["pattern"] == REQUEST_ID_PATTERN


def test_schema_examples_load(tmp_path: Path, schema: dict) -> None:
    for example in schema["examples"]:
        load_manifest(write_json(tmp_path, example))


def _every_bmp_variant() -> list[str]:
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    return [variant for c in chars for variant in (c, "a" + c, c + "a", "a" + c + "a")]


def test_schema_patterns_agree_with_the_loader_on_every_bmp_character(schema: dict) -> None:
    """The schema's regexes (ECMA-262 that Python reads alike) and the loader's hand-written checks agree."""
    id_pattern = re.compile(schema["properties"]["sample_ids"]["items"]["pattern"])
    reason_pattern = re.compile(schema["properties"]["reason"]["pattern"])
    for text in _every_bmp_variant():
        assert (sample_id_problem(text) is None) == bool(id_pattern.fullmatch(text)), repr(text)
        assert bool(text.strip()) == bool(reason_pattern.search(text)), repr(text)
