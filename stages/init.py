"""`legonet init`: turn labelled samples into a fresh DVC project (git + DVC + params + hash-carved splits).

The bundled MNIST digits go through exactly the path a user's own file takes, so what is tested on the demo data
holds for real data. Splits not given as files are carved by a stable hash of ``sample_id``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from ruamel.yaml import YAML

from pipeline.dataset import (
    DataError,
    SplitFractions,
    bundled_mnist,
    carve,
    check_samples,
    read_samples,
    write_table,
)
from pipeline.layout import REFERENCE, TEST, raw_path
from stages.project import PARAMS, check_params, sync_generated

TEMPLATE = Path(__file__).resolve().parent.parent  # the checkout's dvc.yaml and params.yaml are the template
GITIGNORE = "/mlflow.db\n/mlartifacts/\n/.legonet/\n"
DVCIGNORE = "/mlflow.db\n/mlartifacts/\n/.legonet/\n/audit/\n"


class InitError(RuntimeError):
    """The target folder cannot become a project as asked; the message says why and what to pass."""


def run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InitError(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout}{result.stderr}")


def set_params(path: Path, updates: dict[str, Any]) -> None:
    """Set dotted keys in params.yaml, keeping its comments and layout (ruamel round-trip)."""
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(path.read_text())
    for dotted, value in updates.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for key in parents:
            if key not in node:
                raise InitError(f"{path}: no section `{key}` for --set {dotted}")
            node = node[key]
        if leaf not in node:
            raise InitError(f"{path}: unknown key `{dotted}`; see params.yaml for the keys")
        node[leaf] = value
    with open(path, "w") as handle:
        yaml.dump(doc, handle)


def init_project(
    root: Path,
    data: Path | None = None,
    reference: Path | None = None,
    test: Path | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Create (or, with ``force``, reset) a project at ``root``; returns row counts per split.

    Everything is checked before anything is written: params (with the ``--set`` overrides) are staged in a
    temporary file and the data fully validated and carved first, so bad input leaves the folder untouched (no
    params.yaml, git, DVC or data files), and ``--force`` never deletes an existing project's data for bad input.
    """
    if ((root / "data").exists() or (root / "dvc.lock").exists()) and not force:
        raise InitError(f"{root} already holds a legonet project (data/ or dvc.lock exists); "
                        "pass --force to replace its data, or choose an empty folder")
    overrides = dict(overrides or {})
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / PARAMS.name
        current = root / PARAMS
        shutil.copyfile(current if current.is_file() else TEMPLATE / PARAMS.name, staged)
        if overrides:
            set_params(staged, overrides)
        files = _validated_files(staged, data, reference, test, user_classes="data.classes" in overrides)
        params_text = staged.read_text()

    root.mkdir(parents=True, exist_ok=True)
    if force:
        for stale in ("data", "models", "metrics", "dvc.lock"):
            target = root / stale
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if not (root / "dvc.yaml").exists():
        shutil.copyfile(TEMPLATE / "dvc.yaml", root / "dvc.yaml")
    (root / PARAMS).write_text(params_text)
    if not (root / ".git").exists():
        run(["git", "init", "-q"], root)
    if not (root / ".dvc").exists():
        run(["dvc", "init", "-q"], root)
        run(["dvc", "config", "core.autostage", "true"], root)
    for name, text in ((".gitignore", GITIGNORE), (".dvcignore", DVCIGNORE)):
        path = root / name
        existing = path.read_text() if path.exists() else ""
        missing = [line for line in text.splitlines() if line not in existing.splitlines()]
        if missing:
            path.write_text(existing + ("" if existing.endswith("\n") or not existing else "\n")
                            + "\n".join(missing) + "\n")
    for path, frame in files.items():
        write_table(frame, root / path)
    sync_generated(root)
    run(["dvc", "add", "-q", *[p.as_posix() for p in files]], root)
    return {path.as_posix(): len(frame) for path, frame in files.items()}


def _validated_files(params_path: Path, data: Path | None, reference: Path | None, test: Path | None,
                     user_classes: bool) -> dict[Path, pd.DataFrame]:
    """Read and validate the samples against the staged params (updating their derived keys); carve the splits.

    ``data.classes`` is derived from the labels only when the user did not give it with ``--set``: given classes
    are a contract the labels are checked against.
    """
    sources: dict[str, Path | str] = {"data": data or "mnist (bundled)"}
    sources.update({name: path for name, path in (("reference", reference), ("test", test)) if path is not None})
    frames = {name: bundled_mnist() if data is None and name == "data" else read_samples(Path(path))
              for name, path in sources.items()}
    params = YAML(typ="safe").load(params_path.read_text())
    modality = "text" if "text" in frames["data"].columns and "image" not in frames["data"].columns else "image"
    derived: dict[str, Any] = {"data.modality": modality}
    if modality == "text" and params["encoder"]["name"] != "minilm":
        derived["encoder.name"] = "minilm"
    labels = sorted({int(v) for f in frames.values() if "label" in f.columns
                     for v in pd.to_numeric(f["label"], errors="coerce").dropna()})
    if data is not None and not user_classes and labels:  # no labels at all: check_samples names the problem
        derived["data.classes"] = labels
    set_params(params_path, derived)
    params = YAML(typ="safe").load(params_path.read_text())
    check_params(params)
    shape = params["data"].get("image_shape")
    checked = {name: check_samples(frame, sources[name], modality, params["data"]["classes"], shape)
               for name, frame in frames.items()}
    _refuse_overlap(checked)
    fractions = SplitFractions(float(params["data"]["reference_fraction"]), float(params["data"]["test_fraction"]))
    given = {name: frame for name, frame in checked.items() if name != "data"}
    carved = carve(checked["data"], fractions, int(params["data"]["partitions"]), given=frozenset(given))
    carved.update(given)
    files = {REFERENCE: carved["reference"], TEST: carved["test"]}
    files.update({raw_path(i): carved[f"part-{i:04d}"] for i in range(int(params["data"]["partitions"]))})
    if len(carved["reference"]) < int(params["adapters"]["n"]):
        raise InitError(f"the reference split has {len(carved['reference'])} samples, fewer than adapters.n="
                        f"{params['adapters']['n']}; give a larger --reference file or raise data.reference_fraction")
    return files


def _refuse_overlap(frames: dict[str, pd.DataFrame]) -> None:
    seen: dict[str, str] = {}
    for name, frame in frames.items():
        for sample_id in frame["sample_id"]:
            if sample_id in seen:
                raise DataError(f"sample_id {sample_id!r} is in both the {seen[sample_id]} and the {name} file; "
                                "each sample belongs to exactly one split")
            seen[sample_id] = name
