"""`legonet init`: turn labelled samples into a fresh DVC project (git + DVC + params + hash-carved splits).

The bundled MNIST digits go through exactly the path a user's own file takes, so what is tested on the demo data
holds for real data. Splits not given as files are carved by a stable hash of ``sample_id``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from pipeline.audit.keyring import audit_keys, audit_log
from pipeline.audit.secrets import forgotten_by
from pipeline.data.dataset import (
    SplitFractions,
    bundled_mnist,
    carve,
    check_samples,
    label_names,
    read_samples,
    write_table,
)
from pipeline.data.salt import create_secret
from pipeline.errors import DataError, ForgetError, InitError
from pipeline.forget.flow import project_lock
from pipeline.forget.requests import JOURNAL, Journal
from pipeline.project.code import sync_code
from pipeline.project.layout import REFERENCE, TEST, raw_path
from pipeline.project.params import PARAMS, check_params, load_params, sync_generated
from pipeline.runner.build import commit_project
from pipeline.tracking.identity import choose_names, new_project_id, project_id
from pipeline.tracking.lineage import artifact_location

# The repository's own dvc.yaml and params.yaml, shipped as package data: in a checkout these are symlinks to the
# files at the root (one source of truth); a built wheel holds copies of them, so `pip install .` can create projects
TEMPLATE = Path(__file__).resolve().parent / "template"
GITIGNORE = "/mlflow.db\n/mlartifacts/\n/.legonet/\n"
DVCIGNORE = "/mlflow.db\n/mlartifacts/\n/.legonet/\n/audit/\n"
# autostage: DVC stages the .gitignore and .dvc files it writes; no analytics, no update check (phones home)
# the DVC installed beside this legonet, also from a virtual environment that is not activated
DVC = [sys.executable, "-m", "dvc"]
DVC_CONFIG = {"core.autostage": "true", "core.analytics": "false", "core.check_update": "false"}


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
        node[leaf] = _quoted(value)
    with open(path, "w") as handle:
        yaml.dump(doc, handle)


def _quoted(value: Any) -> Any:
    """A string that a YAML reader would take for something else double-quoted: a class or column named `yes`,
    `no`, `null` or `1` must stay a string for PyYAML (YAML 1.1, legonet) and DVC (YAML 1.2) alike."""
    if isinstance(value, str):
        try:
            plain = pyyaml.safe_load(value) == value
        except pyyaml.YAMLError:
            plain = False
        return value if plain else DoubleQuotedScalarString(value)
    if isinstance(value, list):
        seq = CommentedSeq([_quoted(v) for v in value])
        seq.fa.set_flow_style()
        return seq
    return value


@dataclass(frozen=True)
class InitSummary:
    """What `init` wrote (rows per file) and the params it chose from the data, each with its reason."""

    counts: dict[str, int]
    choices: list[str]


def init_project(
    root: Path,
    data: Path | None = None,
    reference: Path | None = None,
    test: Path | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    features: list[str] | None = None,
    data_secret: Path | None = None,
) -> InitSummary:
    """Create (or, with ``force``, reset) a project at ``root``; returns row counts per split and the choices made.

    ``features`` names the payload columns of a table (default: every column but sample_id and label).
    ``data_secret``: another project's data secret to build with (pipeline.data.salt), so that this build can equal
    that project's bit for bit (a from-scratch build on its retained data); default: the project's own, else new.

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
        files, choices = _validated_files(staged, data, reference, test, set(overrides), features)
        choices += _identity(staged, root, set(overrides))  # last: it claims names on a shared MLflow store
        params_text = staged.read_text()

    existing = (root / PARAMS).is_file()
    with project_lock(root, wait=False, notify=print) if existing else nullcontext():  # never under a forget
        if existing:
            _refuse_unfinished_and_forgotten(root, files)
        _write_project(root, params_text, files, force, data_secret)
        commit_project(root, "legonet init" + (f" from {data.name}" if data is not None else " (bundled MNIST)"))
    return InitSummary({path.as_posix(): len(frame) for path, frame in files.items()}, choices)


def _refuse_unfinished_and_forgotten(root: Path, files: dict[Path, pd.DataFrame]) -> None:
    """``--force`` on a project with a history: an interrupted forget must finish first (its journal names rows
    the new data would bring back), and no row may be a sample the audit log lists as forgotten (matched by the
    log's HMAC of each ID, the only form the log keeps)."""
    pending = Journal.load(root)
    if pending is not None:
        raise ForgetError(f"{root / JOURNAL}: the forget of {', '.join(pending.request_ids)} was interrupted; "
                          "finish it (re-run the same `legonet forget`) before replacing the data")
    params = load_params(root)
    log = audit_log(root, params)
    summaries = log.summaries()
    if not any(record["forgotten_ids"] for record in summaries):
        return
    back = sorted(forgotten_by(summaries, audit_keys(root, params, log))(
        sample_id for frame in files.values() for sample_id in frame["sample_id"]))
    if back:
        shown = ", ".join(repr(i) for i in back[:5]) + (f" (and {len(back) - 5} more)" if len(back) > 5 else "")
        raise DataError(f"{len(back)} sample(s) of the new data were forgotten by an earlier request (the audit "
                        f"log lists them): {shown}; remove them from the data before `legonet init --force`")


def _write_project(root: Path, params_text: str, files: dict[Path, pd.DataFrame], force: bool,
                   data_secret: Path | None) -> None:
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
        run([*DVC, "init", "-q"], root)
    for key, value in DVC_CONFIG.items():
        run([*DVC, "config", key, value], root)
    for name, text in ((".gitignore", GITIGNORE), (".dvcignore", DVCIGNORE)):
        path = root / name
        existing = path.read_text() if path.exists() else ""
        missing = [line for line in text.splitlines() if line not in existing.splitlines()]
        if missing:
            path.write_text(existing + ("" if existing.endswith("\n") or not existing else "\n")
                            + "\n".join(missing) + "\n")
    create_secret(root, data_secret)  # before the first table: each is salted with it
    for path, frame in files.items():
        write_table(frame, root / path)
    sync_generated(root)
    sync_code(root)
    run([*DVC, "add", "-q", *[p.as_posix() for p in files]], root)


def _identity(params_path: Path, root: Path, user_set: set[str]) -> list[str]:
    """Give the staged params the project's ID (kept on ``--force``, else new) and MLflow names that no other
    project on a shared store uses (``pipeline.tracking.identity``); returns the choices made, with reasons."""

    params = YAML(typ="safe").load(params_path.read_text())
    pid = (params.get("project") or {}).get("id") or new_project_id()
    project_id({"project": {"id": pid}})  # an ID given with --set must be one
    settings = params["mlflow"]
    names = choose_names(settings["tracking_uri"], pid, settings["experiment"], settings["registered_model"],
                         user_set, artifact_location(settings["tracking_uri"], root))
    write_project_id(params_path, pid)
    set_params(params_path, {f"mlflow.{key}": name for key, name in names.items()})
    return [f"mlflow.{key}: {name} (`{settings[key]}` belongs to another project on {settings['tracking_uri']})"
            for key, name in names.items() if name != settings[key]]


def write_project_id(path: Path, pid: str) -> None:
    """Set ``project.id`` in a params file, adding the section (before ``mlflow``) to one made before IDs."""
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(path.read_text())
    if "project" not in doc:
        doc.insert(list(doc).index("mlflow") if "mlflow" in doc else len(doc), "project", {"id": pid})
    else:
        doc["project"]["id"] = pid
    with open(path, "w") as handle:
        yaml.dump(doc, handle)


def _validated_files(params_path: Path, data: Path | None, reference: Path | None, test: Path | None,
                     user_set: set[str], features: list[str] | None) -> tuple[dict[Path, pd.DataFrame], list[str]]:
    """Read and validate the samples against the staged params (updating their derived keys); carve the splits.

    Keys the user gave with ``--set`` are never changed: given classes are a contract the labels are checked
    against. The others that depend on the data (modality, encoder, classes, features, adapters.n, the reference
    split's size) are derived from it, each choice returned with its reason.
    """
    sources: dict[str, Path | str] = {"data": data or "mnist (bundled)"}
    sources.update({name: path for name, path in (("reference", reference), ("test", test)) if path is not None})
    frames = {name: bundled_mnist() if data is None and name == "data" else read_samples(Path(path))
              for name, path in sources.items()}
    params = YAML(typ="safe").load(params_path.read_text())
    modality, columns = _payload(frames["data"], features)
    derived: dict[str, Any] = {"data.modality": modality, "data.features": columns}
    encoder = {"image": "efficientnet-lite0", "text": "minilm", "table": "none"}[modality]
    if "encoder.name" not in user_set and (params["encoder"]["name"] != encoder):
        derived["encoder.name"] = encoder
    width = int(params["projection"]["dim"])
    if modality == "table" and "projection.dim" not in user_set and len(columns) <= width:
        derived["projection.dim"] = 0  # standardised features at their own width: a PCA to more would fail
    shaped = _square_images(frames, params) if modality == "image" and "data.image_shape" not in user_set else None
    if shaped:
        derived["data.image_shape"] = shaped
    labels = [v for f in frames.values() if "label" in f.columns for v in f["label"].tolist()]
    if data is not None and "data.classes" not in user_set and labels:  # none: check_samples names the problem
        named = label_names(labels)
        derived["data.classes"] = sorted({str(v) for v in labels} if named else {int(v) for v in labels})
    set_params(params_path, derived)
    params = YAML(typ="safe").load(params_path.read_text())
    counts = {name: len(frame) for name, frame in frames.items()}
    choices = defaults_from_data(params, counts, user_set)
    set_params(params_path, {key: value for key, value, _ in choices})
    params = YAML(typ="safe").load(params_path.read_text())
    check_params(params)
    shape = params["data"].get("image_shape")
    checked = {name: check_samples(frame, sources[name], modality, params["data"]["classes"], shape, columns)
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
    if shaped:
        choices.insert(0, ("data.image_shape", shaped, "every image has that many pixels, taken as a square"))
    return files, [f"{key}: {value} ({why})" for key, value, why in choices]


def _square_images(frames: dict[str, pd.DataFrame], params: dict[str, Any]) -> list[int] | None:
    """[s, s] when every image has s x s pixels and params say another shape; else None (the contract then names
    the images of another size)."""
    sizes = {len(b) for f in frames.values() if "image" in f.columns for b in f["image"] if isinstance(b, bytes)}
    side = round(next(iter(sizes)) ** 0.5) if len(sizes) == 1 else 0
    if not side or side * side != next(iter(sizes)) or side * side == int(np.prod(params["data"]["image_shape"])):
        return None
    return [side, side]


def _payload(frame: pd.DataFrame, features: list[str] | None) -> tuple[str, list[str]]:
    """The modality of a sample table and, for a table, its feature columns (``--features``, else every column
    but sample_id and label)."""
    if features:
        return "table", list(features)
    if "image" in frame.columns:
        return "image", []
    if "text" in frame.columns:
        return "text", []
    return "table", [str(c) for c in frame.columns if c not in ("sample_id", "label")]


# Rows each adapter should train on: with a few hundred rows an adapter still falls short of the linear probe on
# small data (docs/own-data.md), so aim well above that.
ROWS_PER_ADAPTER = 600
ADAPTERS_RANGE = (4, 256)
KEYS_PER_REFERENCE = 4  # reference samples per key, at least: k-means needs points to place n keys among
# Training rows per raw partition, at most, when init chooses data.partitions: a forget re-reads and rewrites the
# raw and encoded partitions of its samples, so their size is a floor under its cost.
ROWS_PER_PARTITION = 4096


def defaults_from_data(params: dict[str, Any], counts: dict[str, int], user_set: set[str]
                       ) -> list[tuple[str, Any, str]]:
    """adapters.n (and adapters.blocks, at most n), data.reference_fraction and data.partitions from the number of
    samples, unless the user set them.

    n is the largest power of two that leaves each adapter about ``ROWS_PER_ADAPTER`` training rows (a sample
    trains k adapters: n = train x k / 600), within ``ADAPTERS_RANGE`` and at least k + 1; the reference split,
    where the n keys are placed, then needs ``KEYS_PER_REFERENCE`` samples per key. The train partitions stay at
    the template's count until they would hold more than ``ROWS_PER_PARTITION`` rows each. Returns (key, value,
    why).
    """
    choices: list[tuple[str, Any, str]] = []
    total, k = counts["data"], int(params["adapters"]["k"])
    reference = float(params["data"]["reference_fraction"])
    test = float(params["data"]["test_fraction"]) if "test" not in counts else 0.0
    carved_reference = "reference" not in counts
    train = int(total * (1 - (reference if carved_reference else 0.0) - test))
    n = int(params["adapters"]["n"])
    if "adapters.n" not in user_set:
        wanted = max(ADAPTERS_RANGE[0], k + 1, min(ADAPTERS_RANGE[1], train * k // ROWS_PER_ADAPTER))
        n = 1 << (wanted.bit_length() - 1)
        n = n if n > k else n * 2
        choices.append(("adapters.n", n, f"~{train:,} training samples x k={k} / {n} adapters = "
                                         f"~{train * k // n:,} rows per adapter; aim {ROWS_PER_ADAPTER}"))
    blocks = params["adapters"].get("blocks")
    if "adapters.blocks" not in user_set and blocks is not None and int(blocks) > n:
        choices.append(("adapters.blocks", n, f"one train stage per adapter: a block past the {n} adapters would "
                                              "train none (`dvc exp run -S adapters.n=...` may still add adapters)"))
    needed = KEYS_PER_REFERENCE * n
    if carved_reference and "data.reference_fraction" not in user_set and reference * total < needed:
        fraction = round(min(0.5, needed / max(total, 1) + 0.02), 2)  # + 0.02: the hash carve is not exact
        choices.append(("data.reference_fraction", fraction,
                        f"{KEYS_PER_REFERENCE} reference samples per key: {needed} of {total:,}"))
    partitions = int(params["data"]["partitions"])
    if "data.partitions" not in user_set and train > partitions * ROWS_PER_PARTITION:
        partitions = -(-train // ROWS_PER_PARTITION)
        choices.append(("data.partitions", partitions, f"~{train:,} training samples in partitions of at most "
                        f"{ROWS_PER_PARTITION:,}: a forget rewrites only its samples' partitions"))
    return choices


def _refuse_overlap(frames: dict[str, pd.DataFrame]) -> None:
    seen: dict[str, str] = {}
    for name, frame in frames.items():
        for sample_id in frame["sample_id"]:
            if sample_id in seen:
                raise DataError(f"sample_id {sample_id!r} is in both the {seen[sample_id]} and the {name} file; "
                                "each sample belongs to exactly one split")
            seen[sample_id] = name
