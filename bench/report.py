"""Markdown tables, plots and the "where we stand" statement, rendered from one results JSON only.

Every number written here is read from the results file; the paper's figures (issue 5) are quoted as such.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

PAPER = ("Paper (LegoNet, arXiv 2210.16023; CIFAR-10, ResNet-34 encoder), as quoted in issue 5: test accuracy full "
         "fine-tune 95.97, SISA s=10 91.66, LegoNet n=100 k=10 90.11; frozen-encoder random shards (s=10) 88.32; "
         "k=1/2/5/10 at n=100: 84.85/87.66/89.72/90.11; mean time of one unlearning: SISA s=10 951 s vs LegoNet "
         "n=100 311 s (3.1x) and n=1000 123 s.")
TITLES = {"mnist5k": "MNIST 5k (the pipeline's default data)", "fashion70k": "Fashion-MNIST 70k",
          "wordnet": "WordNet noun glosses (26 lexicographer classes)", "mnist1k": "MNIST 1k (smoke)"}


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def secs(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}x" if value < 1000 else f"{value:.0f}x"


def _systems(results: dict, dataset: str, kind: str | None = None) -> list[dict]:
    return [s for s in results["datasets"][dataset]["systems"] if kind is None or s["system"] == kind]


def _lego(results: dict, dataset: str, n: int, k: int) -> dict | None:
    return next((s for s in _systems(results, dataset, "legonet") if s["n"] == n and s["k"] == k), None)


def _sisa(results: dict, dataset: str, s: int) -> dict | None:
    return next((x for x in _systems(results, dataset, "sisa") if x["s"] == s), None)


def _acc(entry: dict, seeds: int = 1) -> str:
    a = entry["accuracy"]
    if len(a["per_seed"]) < seeds:
        return f"{pct(a['mean'])} (seed 0 only)"
    spread = f" ± {pct(a['std'])}" if len(a["per_seed"]) > 1 else ""
    rng = f" ({pct(a['min'])}-{pct(a['max'])})" if len(a["per_seed"]) > 1 else ""
    return f"{pct(a['mean'])}{spread}{rng}"


# ---------------------------------------------------------------------------------------------------- tables
def system_table(results: dict, dataset: str) -> list[str]:
    """Accuracy and the expected cost of forgetting one uniformly random sample (from per-head build times)."""
    systems = _systems(results, dataset)
    rebuild = any("speedup_vs_full_rebuild" in e["expected_forget_1"] for e in systems)
    head = ["system", "heads", "test accuracy % (mean ± sd, min-max)", "rows per head (min-max)",
            "E[forget 1]: heads / samples / params retrained", "E[forget 1]: compute s wall (CPU)", "speedup vs probe"]
    if rebuild:
        head.append("speedup vs `dvc repro -f`")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in systems:
        x = e["expected_forget_1"]
        cells = [e["label"], str(e["heads"]), _acc(e, results["config"]["seeds"]),
                 f"{e['min_head_rows']:,}-{e['max_head_rows']:,}",
                 f"{x['heads']:g} / {x['samples']:,} / {x['params']:,}",
                 f"{secs(x['seconds'])} ({secs(x.get('cpu_seconds'))})",
                 "1x" if e["system"] == "probe" else times(x.get("speedup_vs_probe"))]
        if rebuild:
            cells.append(times(x.get("speedup_vs_full_rebuild")))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def request_table(results: dict, dataset: str) -> list[str]:
    """The measured forget of the same random requests in every system (seed 0)."""
    sizes = list(results["config"]["request_sizes"])
    systems = _systems(results, dataset)
    rebuild = any("speedup_vs_full_rebuild" in f for e in systems for f in e["forget"].values())
    head = ["system"]
    for size in sizes:
        head += [f"{size}: heads / samples / params retrained", f"{size}: compute s wall (CPU)", f"{size}: vs probe"]
        if rebuild:
            head.append(f"{size}: vs `dvc repro -f`")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in systems:
        cells = [e["label"]]
        for size in sizes:
            f = e["forget"].get(str(size))
            if f is None:
                cells += ["not run (plan)", "", "", *([""] if rebuild else [])]
                continue
            cells += [f"{f['heads_retrained']} / {f['samples_retrained']:,} / {f['params_retrained']:,}",
                      f"{secs(f['retrain_seconds'])} ({secs(f.get('retrain_cpu_seconds'))})",
                      "1x" if e["system"] == "probe" else times(f.get("speedup_vs_probe"))]
            if rebuild:
                cells.append(times(f.get("speedup_vs_full_rebuild")))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def grid_table(results: dict, dataset: str) -> list[str]:
    lego = _systems(results, dataset, "legonet")
    ns = sorted({s["n"] for s in lego})
    ks = sorted({s["k"] for s in lego})
    rows = ["| n \\ k | " + " | ".join(f"k={k}" for k in ks) + " | SISA s=n |", "|" + "---|" * (len(ks) + 2)]
    for n in ns:
        cells = []
        for k in ks:
            e = _lego(results, dataset, n, k)
            cells.append("-" if e is None else pct(e["accuracy"]["mean"]))
        s = _sisa(results, dataset, n)
        rows.append(f"| n={n} | " + " | ".join(cells) + f" | {'-' if s is None else pct(s['accuracy']['mean'])} |")
    return rows


def sequential_table(results: dict, dataset: str) -> list[str]:
    seq = [s for s in _systems(results, dataset) if s.get("sequential")]
    if not seq:
        return []
    rows = ["| system | requests (one by one) | accuracy % before → after | heads retrained (total) "
            "| samples retrained (total) | retrain compute s: total (measured + estimated) / mean per request |",
            "|---|---|---|---|---|---|"]
    notes = []
    for e in seq:
        q = e["sequential"]
        if q.get("extrapolated_total"):
            literal = "none: each is a full retrain"
            compute = (f"{secs(q['retrain_seconds_total'])} (0 + {secs(q['retrain_seconds_total'])}) / "
                       f"{secs(q['retrain_seconds_mean'])}")
        else:
            literal = str(q.get("literal_requests", q["requests"]))
            rest = q.get("retrain_seconds_estimated_rest", 0.0)
            compute = (f"{secs(q['retrain_seconds_total'])} ({secs(q.get('retrain_seconds_literal', 0.0))} + "
                       f"{secs(rest)}) / {secs(q['retrain_seconds_mean'])}")
            if "exactness_bit_identical" in q:
                notes.append(f"{e['label']}: after the {literal} literal requests, retraining the "
                             f"{q['exactness_checked_heads']} touched heads once on their current rows gave "
                             f"bit-identical weights: {q['exactness_bit_identical']}; the final state retrained "
                             f"{q['final_state_heads_retrained_once']} heads once "
                             f"({secs(q['final_state_retrain_seconds'])} s).")
        rows.append(f"| {e['label']} | {q['requests']} ({literal}) | {pct(q['accuracy_before'])} → "
                    f"{pct(q['accuracy_after'])} | {q['heads_retrained_total']:,} | {q['samples_retrained_total']:,} "
                    f"| {compute} |")
    rows += ["", "How: requests run one by one retrain only the heads they touch (timed). The probe's every request is "
             "a full retrain, so its state after the last one is one retrain on the final retained set (computed) and "
             "its total is the measured 1-sample retrain x requests. Where fewer requests ran one by one than were "
             "asked (the plan for large datasets), the state after the last request is exact by construction: every "
             "head is a pure function of its rows, so it is computed by retraining each touched head once on its "
             "final rows; the remaining requests' heads and rows are counted exactly and their compute estimated from "
             "the heads' measured training times scaled by rows."]
    rows += [f"- {n}" for n in notes]
    return rows


def plan_lines(plan: dict | None, config: dict) -> list[str]:
    if not plan:
        return []
    grid = ", ".join(f"({n},{k})" for n, k in plan["grid"])
    return [f"*Plan for this dataset (cheaper than the full specification; absent cells were not run):* LegoNet "
            f"(n,k) cells {grid}; all {config['seeds']} seeds for {', '.join(plan['all_seeds'])} (others seed 0 only); "
            f"every request size for {', '.join(plan['all_requests'])} (others the first size only); "
            f"{plan['sequential_literal']} of the {config['sequential']} sequential requests one by one.", ""]


def provenance(results: dict) -> list[str]:
    """For a resumed run: which process and code measured each part (each part's figures come from one process)."""
    if not results.get("resumed_parts"):
        return []
    rows = [f"{part}: revision {p['git_revision']}, sources sha256 {(p.get('code_sha256') or '?')[:16]}"
            + (f", process started {p['process_started_at']}" if p.get("process_started_at") else "")
            for part, p in results.get("parts", {}).items()]
    return [f"- Resumed run (`--resume`; reused parts: {', '.join(results['resumed_parts'])}): each part was measured "
            "by one process; the parts were not all measured by the same process or code"
            + (": " + "; ".join(rows) + "." if rows else ".")]


# ---------------------------------------------------------------------------------------------------- statement
def equal_heads(results: dict, dataset: str) -> list[tuple[int, dict, dict | None, dict | None]]:
    """(n, SISA s=n, LegoNet k=1, the most accurate LegoNet k>1) for every n where SISA and LegoNet both ran."""
    out = []
    for n in sorted({s["n"] for s in _systems(results, dataset, "legonet")}):
        sisa = _sisa(results, dataset, n)
        ks = [e for e in _systems(results, dataset, "legonet") if e["n"] == n]
        if sisa is None or not ks:
            continue
        k1 = next((e for e in ks if e["k"] == 1), None)
        best = max((e for e in ks if e["k"] > 1), key=lambda e: e["accuracy"]["mean"], default=None)
        out.append((n, sisa, k1, best))
    return out


def summary(results: dict) -> list[str]:
    """One row per dataset: the figures the paper's claims rest on, each from this run."""
    def gap(a: dict | None, b: dict | None) -> str:
        return "-" if a is None or b is None else f"{100 * (a['accuracy']['mean'] - b['accuracy']['mean']):+.2f} pt"

    lines = ["| dataset | probe % | best LegoNet % | LegoNet n=100 k=10 vs SISA s=10 (paper +1.79 pt) | best k>1 vs "
             "SISA s=n, over n | one unlearning, LegoNet n=100 k=3 vs SISA s=10 (compute) |",
             "|---|---|---|---|---|---|"]
    for dataset in results["datasets"]:
        probe = _systems(results, dataset, "probe")[0]
        best = max(_systems(results, dataset, "legonet"), key=lambda e: e["accuracy"]["mean"], default=None)
        margins = [100 * (b["accuracy"]["mean"] - s["accuracy"]["mean"])
                   for _, s, _, b in equal_heads(results, dataset) if b is not None]
        over = (f"{min(margins):+.2f} to {max(margins):+.2f} pt (wins {sum(m > 0 for m in margins)} of "
                f"{len(margins)})" if margins else "-")
        sisa10, lego3 = _sisa(results, dataset, 10), _lego(results, dataset, 100, 3)
        cost = "-"
        if sisa10 is not None and lego3 is not None:
            a, b = lego3["expected_forget_1"]["seconds"], sisa10["expected_forget_1"]["seconds"]
            cost = f"{secs(a)} s vs {secs(b)} s"
        lines.append(f"| {TITLES.get(dataset, dataset)} | {pct(probe['accuracy']['mean'])} | "
                     + (f"{pct(best['accuracy']['mean'])} ({best['label']})" if best else "-")
                     + f" | {gap(_lego(results, dataset, 100, 10), _sisa(results, dataset, 10))} | {over} | {cost} |")
    return [*lines, ""]


def statement(results: dict) -> list[str]:
    out: list[str] = []
    for dataset in results["datasets"]:
        title = TITLES.get(dataset, dataset)
        probe = _systems(results, dataset, "probe")[0]
        lines = [f"**{title}.** Single linear probe on all train data: {pct(probe['accuracy']['mean'])}%."]
        best = max(_systems(results, dataset, "legonet"), key=lambda e: e["accuracy"]["mean"], default=None)
        if best is not None:
            gap = 100 * (best["accuracy"]["mean"] - probe["accuracy"]["mean"])
            lines[0] += (f" Best LegoNet: {best['label']} {pct(best['accuracy']['mean'])}% ({gap:+.2f} pt vs the "
                         "probe" + ("; routing to local linear heads makes a non-linear classifier, so the probe is "
                                    "no ceiling here)." if gap > 0 else ")."))
        equal = equal_heads(results, dataset)
        for n, sisa, k1, best in equal:
            parts = [f"n={n}: SISA {pct(sisa['accuracy']['mean'])}"]
            if k1 is not None:
                parts.append(f"LegoNet k=1 {pct(k1['accuracy']['mean'])} "
                             f"({100 * (k1['accuracy']['mean'] - sisa['accuracy']['mean']):+.2f} pt)")
            if best is not None:
                parts.append(f"best k>1 (k={best['k']}) {pct(best['accuracy']['mean'])} "
                             f"({100 * (best['accuracy']['mean'] - sisa['accuracy']['mean']):+.2f} pt)")
            lines.append("  - " + ", ".join(parts))
        if equal:
            wins = sum(1 for _, s, _, b in equal if b is not None and b["accuracy"]["mean"] > s["accuracy"]["mean"])
            k1wins = sum(1 for _, s, k1, _ in equal
                         if k1 is not None and k1["accuracy"]["mean"] > s["accuracy"]["mean"])
            lines.insert(1, f"At equal head count, the best k>1 LegoNet beats random shards (SISA) at {wins} of "
                            f"{len(equal)} n; routing alone (k=1) beats them at {k1wins} of {len(equal)} n:")
        front = pareto(_systems(results, dataset))
        lines.append("  - Pareto front of accuracy vs expected rows retrained to forget one random sample "
                     "(no other system is both more accurate and cheaper): " + "; ".join(
                         f"{e['label']} {pct(e['accuracy']['mean'])}% / {e['expected_forget_1']['samples']:,} rows"
                         for e in front) + ".")
        n100 = [e for e in _systems(results, dataset, "legonet") if e["n"] == 100]
        if n100:
            lines.append("  - k sweep at n=100 (paper: 84.85/87.66/89.72/90.11 for k=1/2/5/10): "
                         + "/".join(pct(e["accuracy"]["mean"]) for e in sorted(n100, key=lambda e: e["k"]))
                         + " for k=" + "/".join(str(e["k"]) for e in sorted(n100, key=lambda e: e["k"])) + ".")
        sisa10 = _sisa(results, dataset, 10)
        paper = _lego(results, dataset, 100, 10)
        if sisa10 is not None and paper is not None:
            gap = 100 * (paper["accuracy"]["mean"] - sisa10["accuracy"]["mean"])
            lines.append(f"  - the paper's headline pair on a frozen encoder (LegoNet n=100 k=10 90.11 vs random "
                         f"shards s=10 88.32, +1.79 pt): here {pct(paper['accuracy']['mean'])} vs "
                         f"{pct(sisa10['accuracy']['mean'])} ({gap:+.2f} pt); probe "
                         f"{pct(probe['accuracy']['mean'])}.")
        balance = _lego(results, dataset, 100, 3) or next(iter(_systems(results, dataset, "legonet")), None)
        if balance is not None:
            n_train = results["datasets"][dataset]["info"]["train"]
            n, k = balance["n"], balance["k"]
            even = k * n_train / n
            lines.append(f"  - routing balance (n={n}, k={k}): heads hold {balance['min_head_rows']:,} to "
                         f"{balance['max_head_rows']:,} rows (even split: {even:,.0f}); forgetting one random sample "
                         f"retrains {balance['expected_forget_1']['samples']:,} rows on average, "
                         f"{balance['expected_forget_1']['samples'] / (k * even):.1f}x the {k * even:,.0f} of an even "
                         "split, because a random sample more likely sits in a big head.")
        if sisa10 is not None and n100:
            f1 = sisa10["expected_forget_1"]["seconds"]
            parts = [f"k={e['k']} {secs(e['expected_forget_1']['seconds'])} s "
                     f"({f1 / e['expected_forget_1']['seconds']:.1f}x)"
                     for e in sorted(n100, key=lambda e: e["k"]) if e["expected_forget_1"]["seconds"] > 0]
            lines.append(f"  - mean compute of one unlearning (expected over a random sample), SISA s=10 {secs(f1)} s "
                         f"vs LegoNet n=100: {', '.join(parts)} (paper: 951 s vs 311 s, 3.1x faster). LegoNet retrains "
                         "k heads of about kN/n rows each, SISA one head of N/s rows.")
        out += [*lines, ""]
    project = results.get("project")
    if project:
        out += project_statement(project)
    return out


def pareto(systems: list[dict]) -> list[dict]:
    """Systems no other system beats on both accuracy (higher) and expected rows retrained (lower), cheapest first."""
    def dominated(e: dict) -> bool:
        a, c = e["accuracy"]["mean"], e["expected_forget_1"]["samples"]
        return any(o is not e and o["accuracy"]["mean"] >= a and o["expected_forget_1"]["samples"] <= c
                   and (o["accuracy"]["mean"] > a or o["expected_forget_1"]["samples"] < c) for o in systems)

    return sorted((e for e in systems if not dominated(e)), key=lambda e: e["expected_forget_1"]["samples"])


def project_statement(project: dict) -> list[str]:
    repro = project["repro_force"]["seconds"]
    lines = [f"**End to end (real project on {TITLES.get(project.get('data', 'mnist5k'))}, "
             f"{project['train_samples']} train samples, "
             f"n={project['params']['adapters.n']}, k={project['params']['adapters.k']}).** "
             f"`dvc repro -f` (retrain from scratch): {secs(repro)} s."]
    for size, f in project["forget"].items():
        floor = f.get("compute_floor", {})
        t = f["breakdown"]["totals"]
        kinds = f["breakdown"]["by_stage_kind"]
        train = kinds.get("train", {})
        package = kinds.get("package", {})
        other_bodies = t["repro_stage_bodies"] - train.get("body", 0.0) - package.get("body", 0.0)
        dvc = t["remove_rows_and_dvc_add"] + t["repro_dvc_per_stage"] - package.get("dvc", 0.0) + \
            t["repro_dvc_outside_stages_and_checks"]
        mlflow = package.get("wall", 0.0) + t["register_mlflow"]
        startup = t["repro_stage_startup_imports"] - package.get("startup_imports", 0.0) + \
            t["cli_startup_and_unaccounted"]
        floor_s = floor.get("retrain_seconds")
        wall = f["wall_seconds"]
        ratio = repro / wall
        versus = (f"{times(ratio)} faster than" if ratio >= 1.05 else "about as long as" if ratio > 0.95
                  else f"{times(1 / ratio)} slower than")
        parts = [f"`legonet forget` of {size} sample(s): {secs(wall)} s wall "
                 f"({versus} `dvc repro -f`), {len(f['retrained_adapters'])} adapter(s) "
                 f"retrained, {len(f['stages_run'])} DVC stages run."]
        if floor_s is not None:
            parts.append(f"The compute floor (the same adapters retrained in-process) is {secs(floor_s)} s, "
                         f"{100 * floor_s / wall:.1f}% of the wall time. The rest:")
        train_extra = train.get("body", 0.0) - (floor_s or 0.0)
        ranked = sorted(kinds.items(), key=lambda kv: -kv[1]["body"])
        others = ", ".join(f"{kind} {secs(row['body'])}" for kind, row in ranked if kind not in ("train", "package"))
        parts.append(
            f"train stage bodies beyond the floor (torch import, shard read, digests, write) {secs(train_extra)} s; "
            f"the other stages that the deletion invalidates {secs(other_bodies)} s ({others} s); "
            f"process start-up and imports {secs(startup)} s (stages, calibrated, plus the CLI's own); "
            f"DVC (row removal + `dvc add`, per-stage hashing/caching/lock, repro start and checks) {secs(dvc)} s; "
            f"MLflow (package stage + registration) {secs(mlflow)} s; purge (DVC objects + MLflow versions) "
            f"{secs(t['purge_dvc_and_mlflow'])} s; audit record + git {secs(t['audit_sign_and_git'])} s.")
        lines.append("- " + " ".join(parts))
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------------- project
def project_tables(project: dict) -> list[str]:
    repro = project["repro_force"]
    kinds: dict[str, list[float]] = {}
    for stage, seconds in repro["stage_seconds"].items():
        kinds.setdefault(stage.split("@")[0], []).append(seconds)
    lines = [f"`legonet init` {secs(project['init_seconds'])} s; `dvc repro -f` {secs(repro['seconds'])} s wall "
             f"({secs(repro.get('cpu_seconds'))} s CPU over all its processes) for "
             f"{repro['stages_run']} stages (test accuracy after it: {pct(project['accuracy_after_repro'])}%). "
             f"Params: {project['params']}.", ""]
    lines += ["| `dvc repro -f` stage kind | count | wall s (sum) | mean s |", "|---|---|---|---|"]
    for kind, values in kinds.items():
        lines.append(f"| {kind} | {len(values)} | {secs(sum(values))} | {secs(sum(values) / len(values))} |")
    cal = project["calibration"]
    lines += ["", f"Calibration (best of {cal.get('repeats', 2)} fresh process(es)): "
                  f"python start-up {secs(cal['python_startup'])} s, "
                  f"`import torch` {secs(cal['import_torch'])} s, `import mlflow` {secs(cal['import_mlflow'])} s, "
                  f"`dvc --version` {secs(cal['dvc_version_cli'])} s, the `legonet forget` CLI's imports "
                  f"{secs(cal['legonet_cli_imports'])} s; stage modules: "
                  + ", ".join(f"{k} {secs(v)} s" for k, v in cal["stage_imports"].items()) + ".", ""]
    sizes = list(project["forget"])
    head = ["where the time goes (s)", *[f"forget {s}" for s in sizes]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("wall time of `legonet forget --profile`", lambda f: f["wall_seconds"]),
            ("CPU time of it and all its child processes", lambda f: f.get("cpu_seconds")),
            ("compute floor: the same adapters retrained in-process",
             lambda f: f.get("compute_floor", {}).get("retrain_seconds")),
            ("CLI start-up + unaccounted (wall - phases)",
             lambda f: f["breakdown"]["totals"]["cli_startup_and_unaccounted"]),
            ("validate + lock", lambda f: f["breakdown"]["totals"]["validate_and_lock"]),
            ("remove rows + `dvc add`", lambda f: f["breakdown"]["totals"]["remove_rows_and_dvc_add"]),
            ("rebuild: stage bodies (MLflow `stage_seconds`)",
             lambda f: f["breakdown"]["totals"]["repro_stage_bodies"]),
            ("rebuild: stage process start-up + imports (calibrated)",
             lambda f: f["breakdown"]["totals"]["repro_stage_startup_imports"]),
            ("rebuild: rest of each stage's wall (DVC hashing/cache/lock; for package: MLflow import + flush)",
             lambda f: f["breakdown"]["totals"]["repro_dvc_per_stage"]),
            ("rebuild: DVC outside stages + exactness checks",
             lambda f: f["breakdown"]["totals"]["repro_dvc_outside_stages_and_checks"]),
            ("register (MLflow)", lambda f: f["breakdown"]["totals"]["register_mlflow"]),
            ("purge (DVC cache/remote + MLflow versions)", lambda f: f["breakdown"]["totals"]["purge_dvc_and_mlflow"]),
            ("audit record + git commit", lambda f: f["breakdown"]["totals"]["audit_sign_and_git"])]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(secs(get(project["forget"][s])) for s in sizes) + " |")
    kinds_all = sorted({k for s in sizes for k in project["forget"][s]["breakdown"]["by_stage_kind"]})
    lines += ["", "Per stage kind inside the forget's `dvc repro` (count: wall = body + start-up/imports + rest):", ""]
    lines += ["| stage kind | " + " | ".join(f"forget {s}" for s in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    for kind in kinds_all:
        cells = []
        for s in sizes:
            row = project["forget"][s]["breakdown"]["by_stage_kind"].get(kind)
            cells.append("-" if row is None else f"{row['count']}: {secs(row['wall'])} = {secs(row['body'])} + "
                                                 f"{secs(row['startup_imports'])} + {secs(row['dvc'])}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in sizes:
        floor = project["forget"][s].get("compute_floor")
        if floor:
            lines.append(f"- forget {s}: in-process routing picks the same adapters as the pipeline: "
                         f"{floor['same_adapters_as_pipeline']}; in-process accuracy after equals the pipeline's "
                         f"`metrics/evaluate.json`: {floor['same_accuracy_as_pipeline']} "
                         f"({pct(floor['accuracy_after_in_process'])}% vs "
                         f"{pct(project['forget'][s]['accuracy_after'])}%).")
    return [*lines, ""]


# ---------------------------------------------------------------------------------------------------- plots
def plots(results: dict, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results["datasets"])
    name = results["name"]
    files: dict[str, Path] = {}
    cmap = plt.get_cmap("viridis")

    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter, ScalarFormatter

    def grid(title: str) -> tuple:
        width = max(7.0, 5.2 * len(datasets))
        fig, axes = plt.subplots(1, len(datasets), figsize=(width, 4.4), squeeze=False)
        fig.suptitle(textwrap.fill(title, int(width * 13)), fontsize=10)
        return fig, axes[0]

    def log_x(ax) -> None:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())

    # accuracy vs forget compute time (expected over one random sample)
    fig, axes = grid("test accuracy (mean over seeds) vs mean compute to forget one random train sample "
                     "(expected from the heads' measured training times, seed 0); marker size grows with n")
    for ax, dataset in zip(axes, datasets, strict=True):
        ks = sorted({s["k"] for s in _systems(results, dataset, "legonet")}) or [1]
        for e in _systems(results, dataset):
            t = max(e["expected_forget_1"]["seconds"], 1e-4)
            acc = 100 * e["accuracy"]["mean"]
            if e["system"] == "probe":
                ax.scatter(t, acc, marker="*", s=160, color="black", label="probe (full retrain)", zorder=3)
            elif e["system"] == "sisa":
                ax.scatter(t, acc, marker="s", color="tab:red", label="SISA", zorder=3)
                ax.annotate(f"s={e['s']}", (t, acc), fontsize=7, xytext=(3, -8), textcoords="offset points")
            else:
                color = cmap(ks.index(e["k"]) / max(1, len(ks) - 1))
                ax.scatter(t, acc, color=color, s=12 + 4 * math.log2(e["n"]) ** 2, label=f"LegoNet k={e['k']}",
                           zorder=2, alpha=0.85)
                ax.annotate(f"{e['n']}", (t, acc), fontsize=6, xytext=(4, 3), textcoords="offset points")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        log_x(ax)
        ax.set_xlabel("compute to forget one sample (s, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TITLES.get(dataset, dataset), fontsize=9)
        ax.grid(alpha=0.3)
    files["tradeoff"] = _save(fig, out_dir / f"{name}-accuracy-vs-forget-time.png")

    # k sweep
    fig, axes = grid("k sweep: accuracy vs k per n (error bars: sd over seeds; dotted: SISA with s=n)")
    for ax, dataset in zip(axes, datasets, strict=True):
        ns = sorted({s["n"] for s in _systems(results, dataset, "legonet")})
        for i, n in enumerate(ns):
            color = cmap(i / max(1, len(ns) - 1))
            es = sorted((e for e in _systems(results, dataset, "legonet") if e["n"] == n), key=lambda e: e["k"])
            ax.errorbar([e["k"] for e in es], [100 * e["accuracy"]["mean"] for e in es],
                        yerr=[100 * e["accuracy"]["std"] for e in es], marker="o", color=color, label=f"n={n}",
                        capsize=2)
            sisa = _sisa(results, dataset, n)
            if sisa is not None:
                ax.axhline(100 * sisa["accuracy"]["mean"], color=color, linestyle=":", linewidth=1)
        probe = _systems(results, dataset, "probe")[0]
        ax.axhline(100 * probe["accuracy"]["mean"], color="black", linestyle="--", linewidth=1, label="probe")
        ax.set_xscale("log")
        ax.set_xticks(sorted({e["k"] for e in _systems(results, dataset, "legonet")}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("k (adapters per sample, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TITLES.get(dataset, dataset), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    files["k_sweep"] = _save(fig, out_dir / f"{name}-k-sweep.png")

    # n sweep
    fig, axes = grid("n sweep: accuracy vs number of heads (LegoNet per k, SISA per s)")
    for ax, dataset in zip(axes, datasets, strict=True):
        ks = sorted({s["k"] for s in _systems(results, dataset, "legonet")})
        for i, k in enumerate(ks):
            es = sorted((e for e in _systems(results, dataset, "legonet") if e["k"] == k), key=lambda e: e["n"])
            ax.errorbar([e["n"] for e in es], [100 * e["accuracy"]["mean"] for e in es],
                        yerr=[100 * e["accuracy"]["std"] for e in es], marker="o",
                        color=cmap(i / max(1, len(ks) - 1)), label=f"LegoNet k={k}", capsize=2)
        sisa = sorted(_systems(results, dataset, "sisa"), key=lambda e: e["s"])
        if sisa:
            ax.errorbar([e["s"] for e in sisa], [100 * e["accuracy"]["mean"] for e in sisa],
                        yerr=[100 * e["accuracy"]["std"] for e in sisa], marker="s", color="tab:red",
                        label="SISA (s heads)", capsize=2)
        probe = _systems(results, dataset, "probe")[0]
        ax.axhline(100 * probe["accuracy"]["mean"], color="black", linestyle="--", linewidth=1, label="probe")
        log_x(ax)
        ax.set_xlabel("heads (n or s, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(TITLES.get(dataset, dataset), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    files["n_sweep"] = _save(fig, out_dir / f"{name}-n-sweep.png")
    return files


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- document
def write_report(results: dict, results_dir: Path, docs: Path) -> Path:
    files = plots(results, results_dir)
    docs.parent.mkdir(parents=True, exist_ok=True)
    rel = {k: os.path.relpath(v, docs.parent) for k, v in files.items()}
    m, v, cfg = results["machine"], results["versions"], results["config"]
    json_rel = os.path.relpath(results_dir / f"{results['name']}.json", docs.parent)
    phases = results.get("phase_seconds", {})
    finished = "finished_at" in results
    missing = [d for d in cfg["datasets"] if d not in results["datasets"]]
    lines = [
        "# Benchmarks: exact unlearning speed and accuracy vs full retraining and SISA",
        "",
        f"Generated by `python -m bench` from [`{json_rel}`]({json_rel}); every number below comes from that run "
        + ("(resumed: its parts were measured by separate processes, listed under *How it was run*) "
           if results.get("resumed_parts") else "")
        + "(the paper's are quoted as the paper's). Issue 5.",
        "",
        *([] if finished else [
            f"**Unfinished run:** the parts {', '.join(phases)} are done; {', '.join(missing) or 'nothing'} "
            "still to run. `python -m bench --resume` continues it (finished parts are reused), then rewrites this "
            "page.", ""]),
        "## How it was run",
        "",
        f"- Command: `{results['command']}` (mode `{results['mode']}`), from the repository root.",
        f"- Date: {results['started_at']} → {results.get('finished_at', '(unfinished)')} (UTC); wall time "
        f"{secs(results.get('wall_seconds', sum(v for v in phases.values() if v)))} s "
        f"(per part: {', '.join(f'{k} {secs(s)} s' for k, s in phases.items())}).",
        f"- Machine: {m['nproc']} CPUs (nproc), {m['cpu_model']} ({m['cpu_isa']}), {m['mem_gib']} GiB RAM, "
        f"{m['platform']}, Python {m['python']}. Load average at start {results['load_average_start']}, at end "
        f"{results.get('load_average_end', '(unfinished)')}: the machine is shared, so absolute times carry that "
        "noise; systems were measured one after another in one process.",
        f"- Versions: {', '.join(f'{k} {x}' for k, x in v.items() if x)}; code revision {results['git_revision']} "
        f"(bench/ + pipeline/ sources sha256 {results.get('code_sha256', '?')[:16]}).",
        *provenance(results),
        f"- Grid: seeds {cfg['seeds']} (a seed changes adapter/head seeds and the SISA assignment; keys and projection "
        f"are fitted once on the reference split), LegoNet n ∈ {cfg['n']} x k ∈ {cfg['k']} (k ≤ n), SISA s ∈ "
        f"{sorted(cfg['sisa'])}, forget requests of {cfg['request_sizes']} random train samples (timed on seed 0), "
        f"{cfg['sequential']} sequential single-sample requests on {cfg['sequential_systems']} (seed 0).",
        f"- Training params (from `params.yaml`): adapters/SISA heads {results['params']['adapters']['train']}; "
        f"probe {results['params']['baseline']} (as the pipeline's `baseline` stage); projection "
        f"{results['params']['projection']}; keys {results['params']['keys']}; splits reference "
        f"{results['params']['data']['reference_fraction']} / test {results['params']['data']['test_fraction']} by "
        "`pipeline.data.dataset.split_of`.",
        "- Method: every dataset is encoded once with the pipeline's exported ONNX encoder (`pipeline.model.encoder`), "
        "cached by encoder-file and dataset digest; projection and keys by `pipeline.model.keys` on the reference "
        "split "
        "only; routing by `pipeline.model.routing.route`/`shard`; every head by "
        "`pipeline.model.adapters.train_adapter` with "
        "`adapter_seed`; LegoNet prediction by `pipeline.model.ensemble.Ensemble`. All systems see the same projected "
        "features. *Forget compute* is the time to retrain exactly the affected heads in-process on their rows minus "
        "the forgotten ones (the exact unlearning of each system; for the probe a full retrain). *Samples retrained* "
        "counts rows read by the retraining (a LegoNet sample sits in k heads). Times are wall seconds with the "
        "process CPU seconds in brackets (training is single-threaded, so CPU time is what the work costs without "
        "the other load on this shared machine; wall time is what a user waits).",
        "",
        "## Where we stand against the paper",
        "",
        PAPER,
        "",
        "In short (details below; mean test accuracy over the seeds run; one unlearning = the expected retraining "
        "compute for one uniformly random train sample):",
        "",
        *summary(results),
        *statement(results),
    ]
    for dataset, block in results["datasets"].items():
        info = block["info"]
        lines += [
            f"## {TITLES.get(dataset, dataset)}",
            "",
            f"{info['samples']:,} samples ({info['source']}): {info['train']:,} train, {info['reference']:,} "
            f"reference, {info['test']:,} test; {len(info['classes'])} classes; encoder {info['encoder']}"
            + (f" at {info['image_size']} px" if info.get("image_size") else "")
            + f" ({info['encoder_dim']}-d, ONNX sha256 {info['encoder_onnx_sha256'][:12]}…) projected to "
            f"{info['projection_dim']}-d. Embeddings {'from the cache' if info['cached'] else 'encoded in this run'}"
            + (f" (encoding took {secs(info['encode_seconds_when_cached'])} s when first made)"
               if info.get("encode_seconds_when_cached") is not None else "") + ".",
            "",
            *plan_lines(block.get("plan"), results["config"]),
            "Accuracy, and the expected cost of forgetting one uniformly random train sample (head j is hit with "
            "probability |S_j|/N; compute = that mix of the heads' measured training times, seed 0):",
            "",
            *system_table(results, dataset),
            "",
            "Measured: the same random requests forgotten in every system (seed 0; retrain compute only):",
            "",
            *request_table(results, dataset),
            "",
            "LegoNet accuracy (%) over the grid, with SISA at the same number of heads:",
            "",
            *grid_table(results, dataset),
            "",
        ]
        seq = sequential_table(results, dataset)
        if seq:
            lines += ["Sequential single-sample requests (each retrains only the heads it touches):", "", *seq, ""]
    if results.get("project"):
        data = results["project"].get("data", "mnist5k")
        lines += [f"## System 4: the real pipeline (DVC + MLflow) on {TITLES.get(data, data)}", "",
                  *project_tables(results["project"])]
    scale = results_dir / "scale.json"
    if scale.is_file():  # `python -m bench.scale` (the pipeline end to end as the data grows), run on its own
        from bench.scale import report as scale_report

        lines += ["## Forget cost as the data grows: the real pipeline, `python -m bench.scale`", "",
                  *scale_report(json.loads(scale.read_text())), ""]
    lines += ["## Plots", "", f"![accuracy vs forget time]({rel['tradeoff']})", "", f"![k sweep]({rel['k_sweep']})",
              "", f"![n sweep]({rel['n_sweep']})", ""]
    docs.write_text("\n".join(lines))
    return docs
