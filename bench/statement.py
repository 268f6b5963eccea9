"""The "where we stand" statement of a results JSON: what the measured figures say, in sentences."""

from __future__ import annotations

from bench.tables import TITLES, lego_entry, pct, secs, sisa_entry, system_entries, times


# ---------------------------------------------------------------------------------------------------- statement
def equal_heads(results: dict, dataset: str) -> list[tuple[int, dict, dict | None, dict | None]]:
    """(n, SISA s=n, LegoNet k=1, the most accurate LegoNet k>1) for every n where SISA and LegoNet both ran."""
    out = []
    for n in sorted({s["n"] for s in system_entries(results, dataset, "legonet")}):
        sisa = sisa_entry(results, dataset, n)
        ks = [e for e in system_entries(results, dataset, "legonet") if e["n"] == n]
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
        probe = system_entries(results, dataset, "probe")[0]
        best = max(system_entries(results, dataset, "legonet"), key=lambda e: e["accuracy"]["mean"], default=None)
        margins = [100 * (b["accuracy"]["mean"] - s["accuracy"]["mean"])
                   for _, s, _, b in equal_heads(results, dataset) if b is not None]
        over = (f"{min(margins):+.2f} to {max(margins):+.2f} pt (wins {sum(m > 0 for m in margins)} of "
                f"{len(margins)})" if margins else "-")
        sisa10, lego3 = sisa_entry(results, dataset, 10), lego_entry(results, dataset, 100, 3)
        cost = "-"
        if sisa10 is not None and lego3 is not None:
            a, b = lego3["expected_forget_1"]["seconds"], sisa10["expected_forget_1"]["seconds"]
            cost = f"{secs(a)} s vs {secs(b)} s"
        lines.append(f"| {TITLES.get(dataset, dataset)} | {pct(probe['accuracy']['mean'])} | "
                     + (f"{pct(best['accuracy']['mean'])} ({best['label']})" if best else "-")
                     + f" | {gap(lego_entry(results, dataset, 100, 10), sisa_entry(results, dataset, 10))} | "
                     f"{over} | {cost} |")
    return [*lines, ""]


def statement(results: dict) -> list[str]:
    out: list[str] = []
    for dataset in results["datasets"]:
        title = TITLES.get(dataset, dataset)
        probe = system_entries(results, dataset, "probe")[0]
        lines = [f"**{title}.** Single linear probe on all train data: {pct(probe['accuracy']['mean'])}%."]
        best = max(system_entries(results, dataset, "legonet"), key=lambda e: e["accuracy"]["mean"], default=None)
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
        front = pareto(system_entries(results, dataset))
        lines.append("  - Pareto front of accuracy vs expected rows retrained to forget one random sample "
                     "(no other system is both more accurate and cheaper): " + "; ".join(
                         f"{e['label']} {pct(e['accuracy']['mean'])}% / {e['expected_forget_1']['samples']:,} rows"
                         for e in front) + ".")
        n100 = [e for e in system_entries(results, dataset, "legonet") if e["n"] == 100]
        if n100:
            lines.append("  - k sweep at n=100 (paper: 84.85/87.66/89.72/90.11 for k=1/2/5/10): "
                         + "/".join(pct(e["accuracy"]["mean"]) for e in sorted(n100, key=lambda e: e["k"]))
                         + " for k=" + "/".join(str(e["k"]) for e in sorted(n100, key=lambda e: e["k"])) + ".")
        sisa10 = sisa_entry(results, dataset, 10)
        paper = lego_entry(results, dataset, 100, 10)
        if sisa10 is not None and paper is not None:
            gap = 100 * (paper["accuracy"]["mean"] - sisa10["accuracy"]["mean"])
            lines.append(f"  - the paper's headline pair on a frozen encoder (LegoNet n=100 k=10 90.11 vs random "
                         f"shards s=10 88.32, +1.79 pt): here {pct(paper['accuracy']['mean'])} vs "
                         f"{pct(sisa10['accuracy']['mean'])} ({gap:+.2f} pt); probe "
                         f"{pct(probe['accuracy']['mean'])}.")
        balance = lego_entry(results, dataset, 100, 3) or next(iter(system_entries(results, dataset, "legonet")), None)
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


