"""Each YAML text parsed once per process: the forget's own readers and DVC's, keyed by the text itself.

A forget reads the same pipeline files many times over: DVC builds its index of dvc.yaml, dvc.lock and every .dvc
file three times (the plan, the rerun, the `dvc status` after it) and parses params.yaml again for every stage it
checks, picking each stage's keys out of it with dpath; legonet's own readers (the up-to-date stamp, the purge, the
artifact list) read dvc.lock again each. At a million samples (180 partitions: 221 stages, 182 .dvc files) that was
about a quarter of the part of a 1-sample forget that is not training, and it grows with the partitions.

So a parse is kept under the sha256 of the exact text it parsed (never a path or a stat: a file rewritten within
the file system's timestamp granularity has other text, hence another key), and every caller gets its own deep
copy (DVC's loaders and ours may change what they are given). ``dvc_parses_once`` applies the same to DVC, for the
calls that read a whole text and return its parse: ruamel's safe load behind its ``parse_yaml`` (not the
round-trip load DVC uses to edit a file) and ``read_param_file`` (the parse plus the picked keys), which is handed
the text read here through a one-file view, so DVC's own code picks the keys from exactly the bytes of the key.
Errors are never kept: a file that does not parse raises every time, as before.

Only runner-side code uses this module; no stage reaches it, so no stage's code entry (``pipeline.project.code``)
changes with it but `package`'s, which holds the whole source.
"""

from __future__ import annotations

import copy
import hashlib
import io
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from pipeline.data.dataset import parse_yaml

LIMIT = 64 << 20  # bytes of text whose parses are kept (dvc.lock at a million samples: 0.4 MB)


class _Parses:
    """Parses by key, least recently used dropped first once their texts pass ``LIMIT`` bytes."""

    def __init__(self) -> None:
        self.kept: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.size = 0

    def get(self, key: Hashable, size: int, parse: Callable[[], Any]) -> Any:
        if key in self.kept:
            self.kept.move_to_end(key)
        else:
            self.kept[key] = (parse(), size)
            self.size += size
            while self.size > LIMIT and len(self.kept) > 1:
                self.size -= self.kept.popitem(last=False)[1][1]
        return copy.deepcopy(self.kept[key][0])


_PARSES = _Parses()


def parse_once(data: bytes) -> Any:
    """``parse_yaml(data)`` (libyaml), parsed once per text."""
    return _PARSES.get(("libyaml", hashlib.sha256(data).digest()), len(data), lambda: parse_yaml(data))


def read_yaml_once(path: Path) -> Any:
    """``read_yaml(path)``, parsed once per text."""
    return parse_once(path.read_bytes())


class _OneFile:
    """A file system that holds one text: DVC's loaders read it through ``open``, exactly as given."""

    def __init__(self, fs: Any, text: str) -> None:
        self.fs, self.text = fs, text

    def suffix(self, path: str) -> str:
        return self.fs.suffix(path)

    def open(self, path: str, *args: Any, **kwargs: Any) -> io.StringIO:
        return io.StringIO(self.text)


_INSTALLED: list[bool] = []


def dvc_parses_once() -> None:
    """Make this process's DVC parse each text once (see the module docstring). Idempotent; call it before
    opening a ``dvc.repo.Repo``."""
    if _INSTALLED:
        return
    # lazy: DVC imported only where needed (seconds), not by every command and stage
    import dvc.dependency.param as param
    import dvc.utils.serialize as serialize
    import dvc.utils.serialize._yaml as dvc_yaml
    import dvc.utils.strictyaml as strictyaml

    ruamel_parse, read_param_file = dvc_yaml.parse_yaml, param.read_param_file

    def parse_yaml_once(text: str, path: Any, *args: Any, **kwargs: Any) -> Any:
        typ = kwargs.get("typ", args[0] if args else "safe")
        # the round-trip parse DVC edits a file through (its comments and order), or a call of another shape
        if typ != "safe" or len(args) > 1 or set(kwargs) - {"typ"} or not isinstance(text, str):
            return ruamel_parse(text, path, *args, **kwargs)
        data = text.encode()
        return _PARSES.get(("ruamel", hashlib.sha256(data).digest()), len(data),
                           lambda: ruamel_parse(text, path, typ="safe"))

    def read_param_file_once(fs: Any, path: Any, key_paths: list[str] | None = None, flatten: bool = False,
                             **load_kwargs: Any) -> Any:
        if load_kwargs:  # a loader option: not a plain read of the text
            return read_param_file(fs, path, key_paths, flatten, **load_kwargs)
        with fs.open(path, encoding="utf-8") as handle:
            data = handle.read().encode()
        key = ("params", str(path), hashlib.sha256(data).digest(), tuple(key_paths or ()), flatten)
        return _PARSES.get(key, len(data), lambda: read_param_file(_OneFile(fs, data.decode()), path, key_paths,
                                                                   flatten))

    # only the names this DVC has (pyproject.toml pins the version it was written against): another version
    # parses as it always does
    for module in (dvc_yaml, serialize, strictyaml):
        if callable(getattr(module, "parse_yaml", None)):
            module.parse_yaml = parse_yaml_once  # type: ignore[attr-defined]
    if callable(getattr(param, "read_param_file", None)):
        param.read_param_file = read_param_file_once  # type: ignore[assignment]
    _INSTALLED.append(True)
