"""Markdown tables of a results JSON (systems, requests, grid, sequential forgets, the pipeline project).

Every number written here is read from the results file; the paper's figures (issue 5) are quoted as such.
"""

from __future__ import annotations

import math

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


def system_entries(results: dict, dataset: str, kind: str | None = None) -> list[dict]:
    return [s for s in results["datasets"][dataset]["systems"] if kind is None or s["system"] == kind]


def lego_entry(results: dict, dataset: str, n: int, k: int) -> dict | None:
    return next((s for s in system_entries(results, dataset, "legonet") if s["n"] == n and s["k"] == k), None)


def sisa_entry(results: dict, dataset: str, s: int) -> dict | None:
    return next((x for x in system_entries(results, dataset, "sisa") if x["s"] == s), None)


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
    systems = system_entries(results, dataset)
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
    systems = system_entries(results, dataset)
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
    lego = system_entries(results, dataset, "legonet")
    ns = sorted({s["n"] for s in lego})
    ks = sorted({s["k"] for s in lego})
    rows = ["| n \\ k | " + " | ".join(f"k={k}" for k in ks) + " | SISA s=n |", "|" + "---|" * (len(ks) + 2)]
    for n in ns:
        cells = []
        for k in ks:
            e = lego_entry(results, dataset, n, k)
            cells.append("-" if e is None else pct(e["accuracy"]["mean"]))
        s = sisa_entry(results, dataset, n)
        rows.append(f"| n={n} | " + " | ".join(cells) + f" | {'-' if s is None else pct(s['accuracy']['mean'])} |")
    return rows


def sequential_table(results: dict, dataset: str) -> list[str]:
    seq = [s for s in system_entries(results, dataset) if s.get("sequential")]
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
            ("quarantine (registry tag)", lambda f: f["breakdown"]["totals"].get("quarantine_mlflow")),
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


