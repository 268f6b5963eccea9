"""One benchmark run: every dataset and system of the chosen mode, then the real project, into one JSON."""

from __future__ import annotations

import fnmatch
import json
import sys
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.data import LOADERS, encode
from bench.setting import (
    REPO,
    SCHEMA,
    Config,
    Reduced,
    code_digest,
    load,
    load_params,
    machine,
    stats,
    versions,
    warm_up,
)
from bench.systems import (
    Features,
    HeadSystem,
    LegoNet,
    Probe,
    Request,
    Sisa,
    forget_once,
    nearest_keys,
    sequential,
)
from pipeline.data.dataset import SplitFractions
from pipeline.model.adapters import TrainParams
from pipeline.model.keys import fit_keys, fit_projection, project
from pipeline.tracking.lineage import git_revision


class Runner:
    def __init__(self, config: Config, cache: Path, say: Callable[[str], None]):
        self.config, self.cache, self.say = config, cache, say
        self.params = load_params(config.params_overrides)
        self.adapter_params = TrainParams(**self.params["adapters"]["train"])
        self.ridge = float(self.params["baseline"]["ridge"])
        self.kept: dict[tuple, HeadSystem] = {}  # seed-0 systems kept for the sequential runs and the project
        warm_up(self.adapter_params)

    # ------------------------------------------------------------------ datasets
    def features(self, name: str) -> tuple[Features, dict]:
        data = self.params["data"]
        fractions = SplitFractions(float(data["reference_fraction"]), float(data["test_fraction"]))
        image_size = self.config.image_size or int(self.params["encoder"]["image_size"])
        dataset = LOADERS[name]()
        encoded = encode(dataset, self.cache, image_size, int(self.params["encoder"]["threads"]), fractions,
                         self.say)
        started = time.perf_counter()
        split = encoded.split
        projection = fit_projection(encoded.embeddings[split == "reference"], int(self.params["projection"]["dim"]))
        points = project(encoded.embeddings, projection)
        features = Features(name, len(dataset.class_names), encoded.sample_ids[split == "train"],
                            points[split == "train"], encoded.labels[split == "train"],
                            points[split == "test"], encoded.labels[split == "test"], points[split == "reference"])
        info = {**encoded.info, "source": dataset.source, "modality": dataset.modality, "samples": len(split),
                "reference": int((split == "reference").sum()), "test": int((split == "test").sum()),
                "train": int((split == "train").sum()), "classes": dataset.class_names,
                "projection_dim": int(points.shape[1]), "projection_seconds": round(time.perf_counter() - started, 3),
                "train_class_counts": np.bincount(features.train_y, minlength=len(dataset.class_names)).tolist()}
        return features, info

    def requests(self, features: Features) -> tuple[dict[str, Request], np.ndarray]:
        rng = np.random.default_rng(self.config.request_seed)
        order = rng.permutation(len(features.train_y))
        out, start = {}, 0
        for size in self.config.request_sizes:
            out[str(size)] = Request(str(size), np.sort(order[start:start + size]))
            start += size
        return out, order[start:start + self.config.sequential]

    # ------------------------------------------------------------------ systems
    def measure(self, label: str, make: Callable[[int], HeadSystem], requests: dict[str, Request],
                probe_times: dict[str, float] | None, keep: tuple | None, plan: Reduced | None, spec: str) -> dict:
        accuracy, build, build_cpu = [], [], []
        entry: dict = {}
        seeds = self.config.seeds if plan is None or _matches(spec, plan.all_seeds) else 1
        if plan is not None and not _matches(spec, plan.all_requests):
            requests = dict(list(requests.items())[:1])
        for seed in range(seeds):
            system = make(seed)
            seconds = system.build()
            accuracy.append(system.accuracy())
            build.append(seconds)
            build_cpu.append(system.build_cpu)
            if seed == 0:
                entry.update(system.describe())
                entry["expected_forget_1"] = system.expected_single()
                if probe_times is not None and entry["expected_forget_1"]["seconds"] > 0:
                    entry["expected_forget_1"]["speedup_vs_probe"] = round(
                        probe_times["expected"] / entry["expected_forget_1"]["seconds"], 3)
                entry["forget"] = {}
                for size, request in requests.items():
                    base = None if probe_times is None else probe_times.get(size)
                    entry["forget"][size] = forget_once(system, request, base)
                if keep is not None:
                    self.kept[keep] = system
        entry["accuracy"] = stats(accuracy)
        entry["build_seconds"] = stats(build)
        entry["build_cpu_seconds"] = stats(build_cpu)
        forget = ", ".join(f"{s}: {v['retrain_seconds']:.2f} s/{v['heads_retrained']} heads"
                           for s, v in entry["forget"].items())
        self.say(f"    {label:<22} acc {entry['accuracy']['mean']:.4f} ±{entry['accuracy']['std']:.4f}  "
                 f"build {entry['build_seconds']['mean']:.1f} s  forget [{forget}]  load {load()}")
        return entry

    def dataset(self, name: str, project_config: tuple[int, int] | None) -> dict:
        cfg = self.config
        self.say(f"dataset {name}")
        features, info = self.features(name)
        self.say(f"  {info['samples']} samples: {info['train']} train, {info['reference']} reference, "
                 f"{info['test']} test; {len(info['classes'])} classes; projected to {info['projection_dim']}")
        requests, seq_rows = self.requests(features)
        systems: list[dict] = []
        want_seq = set(cfg.sequential_systems)
        plan = cfg.reduced.get(name)

        probe = self.measure("probe", lambda seed: Probe(features, self.ridge, seed), requests, None,
                             (name, "probe") if "probe" in want_seq else None, plan, "probe")
        probe_times = {size: v["retrain_seconds"] for size, v in probe["forget"].items()}
        probe_times["expected"] = probe["expected_forget_1"]["seconds"]
        systems.append({"system": "probe", "label": "linear probe (all data)", **probe})

        for s in cfg.sisa:
            if s > len(features.train_y):
                continue
            entry = self.measure(f"SISA s={s}", lambda seed, s=s: Sisa(features, self.adapter_params, seed, s),
                                 requests, probe_times, (name, f"sisa:{s}"), plan, f"sisa:{s}")
            systems.append({"system": "sisa", "s": s, "label": f"SISA s={s}", **entry})

        grid = {(n, k) for n in cfg.n for k in cfg.k if k <= n} if plan is None else set(plan.grid)
        if project_config is not None:
            grid.add(project_config)
        kp = self.params["keys"]
        for n in sorted({n for n, _ in grid}):
            if n > len(features.reference_x):
                self.say(f"  skip n={n}: only {len(features.reference_x)} reference samples")
                continue
            started = time.perf_counter()
            keys = fit_keys(features.reference_x, n, int(kp["seed"]), int(kp["iterations"]))
            keys_seconds = time.perf_counter() - started
            ks = sorted(k for m, k in grid if m == n)
            nearest = nearest_keys(features, keys, max(ks))
            for k in ks:
                entry = self.measure(f"LegoNet n={n} k={k}",
                                     lambda seed, k=k, keys=keys, nearest=nearest: LegoNet(
                                         features, self.adapter_params, seed, keys, k, nearest),
                                     requests, probe_times, (name, f"legonet:{n}:{k}"), plan,
                                     f"legonet:{n}:{k}")
                systems.append({"system": "legonet", "n": n, "k": k, "label": f"LegoNet n={n} k={k}",
                                "keys_seconds": round(keys_seconds, 3), **entry})

        for spec in cfg.sequential_systems:
            if cfg.sequential == 0:
                break
            system = self.kept.get((name, spec))
            if system is None:
                continue
            target = next(e for e in systems if _spec(e) == spec)
            self.say(f"  sequential: {cfg.sequential} single-sample requests on {target['label']} (seed 0)")
            if spec == "probe":
                target["sequential"] = self.probe_sequential(system, seq_rows, target)
            else:
                target["sequential"] = sequential(system, seq_rows, cfg.checkpoints, self.say,
                                                  None if plan is None else plan.sequential_literal)
        for key in [k for k in self.kept if k != (name, _spec_of(project_config))]:
            del self.kept[key]
        return {"info": info, "plan": None if plan is None else asdict(plan),
                "requests": {size: [str(features.train_ids[r]) for r in req.rows] for size, req in requests.items()},
                "sequential_request_ids": [str(features.train_ids[r]) for r in seq_rows], "systems": systems}

    def probe_sequential(self, system: HeadSystem, rows: np.ndarray, entry: dict) -> dict:
        """Every request of the probe is a full retrain from scratch on what remains, so its state after the
        last request is one retrain on the final retained set (computed); its total time is per-request time
        x requests (extrapolated from the measured 1-sample retrain, not run 500 times)."""
        alive = np.ones(len(system.features.train_y), dtype=bool)
        before = system.accuracy()
        alive[rows] = False
        new, seconds = system.retrain([0], alive)
        per = entry["forget"].get("1", {}).get("retrain_seconds", seconds)
        return {"requests": len(rows), "accuracy_before": before, "accuracy_after": system.accuracy(new),
                "curve": [[0, before], [len(rows), system.accuracy(new)]],
                "retrain_seconds_total": round(per * len(rows), 3), "retrain_seconds_mean": per,
                "heads_retrained_total": len(rows),
                "samples_retrained_total": int(len(rows) * alive.sum()), "extrapolated_total": True}

    # ------------------------------------------------------------------ the real project
    def project_floor(self, result: dict, dataset: str) -> None:
        """The compute floor of each project forget: retrain, in-process, the same adapters on the same data."""
        n, k = int(result["params"]["adapters.n"]), int(result["params"]["adapters.k"])
        system = self.kept.get((dataset, f"legonet:{n}:{k}"))
        if system is None:
            return
        index = {sid: i for i, sid in enumerate(system.features.train_ids)}
        alive = np.ones(len(system.features.train_y), dtype=bool)
        for size, forget in result["forget"].items():
            rows = np.array(sorted(index[s] for s in forget["sample_ids"] if s in index), dtype=np.int64)
            alive[rows] = False
            heads = system.affected(rows)
            new, seconds = system.retrain(heads, alive)
            system.weights.update(new)
            forget["compute_floor"] = {
                "retrain_seconds": round(seconds, 4), "retrain_cpu_seconds": round(system.last_cpu, 4),
                "heads": heads, "samples_retrained": system.rows_of(heads, alive),
                "params_retrained": system.params_of(heads), "accuracy_after_in_process": system.accuracy(),
                "same_adapters_as_pipeline": heads == sorted(forget["retrained_adapters"]),
                "same_accuracy_as_pipeline": abs(system.accuracy() - float(forget["accuracy_after"])) < 5e-7}
            self.say(f"  project forget {size}: wall {forget['wall_seconds']:.1f} s vs compute floor "
                     f"{seconds:.2f} s ({len(heads)} adapters; same adapters as the pipeline: "
                     f"{forget['compute_floor']['same_adapters_as_pipeline']})")


def _matches(spec: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(spec, p) for p in patterns)


def _spec(entry: dict) -> str:
    if entry["system"] == "probe":
        return "probe"
    if entry["system"] == "sisa":
        return f"sisa:{entry['s']}"
    return f"legonet:{entry['n']}:{entry['k']}"


def _spec_of(config: tuple[int, int] | None) -> str:
    return "" if config is None else f"legonet:{config[0]}:{config[1]}"


def run(config: Config, cache: Path, results_dir: Path, name: str, command: str, say: Callable[[str], None],
        workdir: Path | None = None, resume: bool = False, rerun: list[str] | None = None) -> dict:
    """Measure everything ``config`` asks for, in one process (the project's CLI, DVC and MLflow in children).

    Order: the project's dataset (mnist5k), then the real project (its compute floor reuses that dataset's
    in-process system), then the rest.
    Results are saved after every part; ``resume`` reuses the finished parts of an interrupted run of the same
    configuration (recorded in ``resumed_parts``); the parts named in ``rerun`` are measured again all the same.
    """
    started_at, started = datetime.now(UTC), time.perf_counter()
    runner = Runner(config, cache, say)
    out: dict = {"schema": SCHEMA, "name": name, "mode": config.mode, "command": command,
                 "started_at": started_at.isoformat(timespec="seconds"), "machine": machine(), "versions": versions(),
                 "git_revision": git_revision(REPO), "code_sha256": code_digest(), "config": asdict(config),
                 "load_average_start": load(),
                 "params": {key: runner.params[key] for key in ("data", "encoder", "projection", "keys", "adapters",
                                                               "baseline")},
                 "datasets": {}, "project": None, "phase_seconds": {}, "resumed_parts": [], "parts": {}}
    # Which code and process measured each part: a resumed run joins parts measured by different processes.
    here = {"git_revision": out["git_revision"], "code_sha256": out["code_sha256"], "process_started_at": out[
        "started_at"]}
    previous = _previous(results_dir, name, out) if resume else None
    project_config, home = None, config.project_data
    if config.project and home in config.datasets:
        merged = {"adapters.n": runner.params["adapters"]["n"], "adapters.k": runner.params["adapters"]["k"],
                  **config.project_overrides}
        project_config = (int(merged["adapters.n"]), int(merged["adapters.k"]))
    order = sorted(config.datasets, key=lambda d: d != home)
    parts = [*order[:1], *(["project"] if config.project else []), *order[1:]]
    if config.project and order[0] != home:
        parts = ["project", *order]
    for part in parts:
        if _reusable(previous, part, rerun or [], home if config.project else None):
            if part == "project":
                out["project"] = previous["project"]
            else:
                out["datasets"][part] = previous["datasets"][part]
            out["phase_seconds"][part] = previous["phase_seconds"].get(part)
            out["parts"][part] = previous.get("parts", {}).get(part) or {
                "git_revision": previous["git_revision"], "code_sha256": previous.get("code_sha256"),
                "process_started_at": None}  # a run from before per-part records: the revision it recorded
            out["resumed_parts"].append(part)
            say(f"{part}: reused from the interrupted run started {previous['started_at']}")
            continue
        mark = time.perf_counter()
        if part == "project":
            from bench.project import run_project

            say("project (system 4): a real legonet project through the CLI, DVC and MLflow")
            overrides = [a for key, value in config.project_overrides.items() for a in ("--set", f"{key}={value}")]
            data = None if home == "mnist5k" else LOADERS[home]().frame
            out["project"] = run_project(workdir, config.project_request_sizes, config.request_seed, say,
                                         init_args=overrides, calibration_repeats=config.calibration_repeats,
                                         data=data)
            out["project"]["data"] = home
            runner.project_floor(out["project"], home)
        else:
            out["datasets"][part] = runner.dataset(part, project_config if part == home else None)
        out["phase_seconds"][part] = round(time.perf_counter() - mark, 1)
        out["parts"][part] = here
        _save(out, results_dir, name)  # partial results survive a crash
    out["datasets"] = {d: out["datasets"][d] for d in config.datasets}
    add_speedups(out)
    out["load_average_end"] = load()
    out["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    if out["resumed_parts"]:
        out["started_at"] = previous["started_at"]
        out["wall_seconds_this_process"] = out["wall_seconds"]
        out["wall_seconds"] = round(sum(v for v in out["phase_seconds"].values() if v), 1)
    _save(out, results_dir, name)
    return out


def _previous(results_dir: Path, name: str, out: dict) -> dict | None:
    path = results_dir / f"{name}.json"
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    # Compare as JSON: the config holds tuples, which come back from the file as lists. A config field added since
    # that run matches when it holds its default (the run measured what the default means).
    now = json.loads(json.dumps({k: out[k] for k in ("config", "params", "versions")}, default=_json_default))
    defaults = json.loads(json.dumps({f.name: f.default_factory() if f.default is MISSING else f.default
                                      for f in fields(Config)
                                      if f.default is not MISSING or f.default_factory is not MISSING},
                                     default=_json_default))
    was = dict(previous.get("config") or {})
    for key, value in now["config"].items():
        if key not in was and value == defaults.get(key):
            was[key] = value
    same = was == now["config"] and all(previous.get(k) == now[k] for k in ("params", "versions"))
    return previous if same else None


def _reusable(previous: dict | None, part: str, rerun: list[str], home: str | None) -> bool:
    """Whether a resumed run takes ``part`` from ``previous``: finished there and not to be measured again. The
    project's dataset (``home``) is measured again with the project: the project's compute floor needs its
    in-process systems."""
    if previous is None or not _finished(previous, part) or part in rerun:
        return False
    return part != home or (_finished(previous, "project") and "project" not in rerun)


def _finished(previous: dict, part: str) -> bool:
    if part == "project":
        return bool(previous.get("project")) and "project" in previous.get("phase_seconds", {})
    return part in previous.get("datasets", {}) and part in previous.get("phase_seconds", {})


def add_speedups(out: dict) -> None:
    """Speedup of each system's forget compute against the full pipeline rebuild (`dvc repro -f`), where the
    dataset is the project's; against the probe it is filled in per dataset already."""
    project = out.get("project")
    home = (project or {}).get("data", "mnist5k")  # results from before the field: the bundled data
    if not project or home not in out["datasets"]:
        return
    repro = project["repro_force"]["seconds"]
    for entry in out["datasets"][home]["systems"]:
        for forget in [*entry["forget"].values(), entry["expected_forget_1"]]:
            seconds = forget.get("retrain_seconds", forget.get("seconds", 0.0))
            forget["speedup_vs_full_rebuild"] = round(repro / seconds, 1) if seconds > 0 else None
    for forget in project["forget"].values():
        forget["speedup_vs_full_rebuild"] = round(repro / forget["wall_seconds"], 2)


def _save(out: dict, results_dir: Path, name: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def command_line() -> str:
    return " ".join(["python -m bench", *sys.argv[1:]])
