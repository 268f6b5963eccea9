"""The project's artifacts as DVC records them (dvc.lock, the .dvc files, the cache's ``.dir`` listings) and the
digest of every file under data/ and models/: what a forget measures before and after its rebuild, and what the
audit compares with the record."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.project.params import lock_md5s
from pipeline.purge.objects import DIR_SUFFIX, dvc_cache, object_path
from pipeline.runner.parsed import read_yaml_once
from pipeline.tracking.lineage import file_md5


def lock_outputs(root: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in dvc.lock and in the .dvc files (directory outputs as .dir)."""
    out = lock_md5s(root)
    for dvc_file in sorted((root / "data").rglob("*.dvc")):
        for o in (read_yaml_once(dvc_file) or {}).get("outs", []):
            out[(dvc_file.parent.relative_to(root) / o["path"]).as_posix()] = o["md5"]
    return dict(sorted(out.items()))


# where the artifacts that decide a prediction live; reports/ holds tables of sample IDs too (the quality
# checkpoint's partials and tables, the test points evaluate keeps), which a forget must clear but which decide nothing
ARTIFACTS = ("data", "models")
ID_TABLES = (*ARTIFACTS, "reports")


def artifact_digests(root: Path, clean: bool = False, tops: tuple[str, ...] = ARTIFACTS) -> dict[str, str]:
    """md5 of every file under ``tops`` (data/ and models/: the artifacts that decide a prediction), without DVC's
    own ``.dvc`` pointer files and ``.gitignore`` files.

    ``clean``: `dvc status` has just reported nothing, so every DVC output holds exactly what dvc.lock and the
    .dvc files record (DVC checked each one, by the same stat-keyed trust ``file_digest`` uses); a file inside an
    output then takes the md5 DVC recorded (from the cache's ``.dir`` listing for a directory output) and only
    files outside every output, or in an output whose listing is not in the cache, are hashed. Hashing all of
    data/ and models/ would make a forget's cost grow with the data (docs/design.md section 4, cost rule).
    """
    files = sorted(f for top in tops if (root / top).is_dir()
                   for f in (root / top).rglob("*") if f.is_file() and not f.name.endswith((".dvc", ".gitignore")))
    recorded = _recorded_digests(root) if clean else {}
    return {rel: recorded.get(rel) or file_md5(f) for f in files for rel in [f.relative_to(root).as_posix()]}


def _recorded_digests(root: Path) -> dict[str, str]:
    """path -> md5 of every file inside a DVC output, as dvc.lock, the .dvc files and the cache's listings say."""
    cache = dvc_cache(root)
    out: dict[str, str] = {}
    for path, md5 in lock_outputs(root).items():
        if not md5.endswith(DIR_SUFFIX):
            out[path] = md5
        elif (listing := object_path(cache, md5)).is_file():
            out.update({f"{path}/{item['relpath']}": item["md5"] for item in json.loads(listing.read_bytes())})
    return out
