"""Plots of a results JSON (matplotlib, written as PNG next to the results)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from bench.tables import TITLES, sisa_entry, system_entries


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
        ks = sorted({s["k"] for s in system_entries(results, dataset, "legonet")}) or [1]
        for e in system_entries(results, dataset):
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
        ns = sorted({s["n"] for s in system_entries(results, dataset, "legonet")})
        for i, n in enumerate(ns):
            color = cmap(i / max(1, len(ns) - 1))
            es = sorted((e for e in system_entries(results, dataset, "legonet") if e["n"] == n), key=lambda e: e["k"])
            ax.errorbar([e["k"] for e in es], [100 * e["accuracy"]["mean"] for e in es],
                        yerr=[100 * e["accuracy"]["std"] for e in es], marker="o", color=color, label=f"n={n}",
                        capsize=2)
            sisa = sisa_entry(results, dataset, n)
            if sisa is not None:
                ax.axhline(100 * sisa["accuracy"]["mean"], color=color, linestyle=":", linewidth=1)
        probe = system_entries(results, dataset, "probe")[0]
        ax.axhline(100 * probe["accuracy"]["mean"], color="black", linestyle="--", linewidth=1, label="probe")
        ax.set_xscale("log")
        ax.set_xticks(sorted({e["k"] for e in system_entries(results, dataset, "legonet")}))
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
        ks = sorted({s["k"] for s in system_entries(results, dataset, "legonet")})
        for i, k in enumerate(ks):
            es = sorted((e for e in system_entries(results, dataset, "legonet") if e["k"] == k), key=lambda e: e["n"])
            ax.errorbar([e["n"] for e in es], [100 * e["accuracy"]["mean"] for e in es],
                        yerr=[100 * e["accuracy"]["std"] for e in es], marker="o",
                        color=cmap(i / max(1, len(ks) - 1)), label=f"LegoNet k={k}", capsize=2)
        sisa = sorted(system_entries(results, dataset, "sisa"), key=lambda e: e["s"])
        if sisa:
            ax.errorbar([e["s"] for e in sisa], [100 * e["accuracy"]["mean"] for e in sisa],
                        yerr=[100 * e["accuracy"]["std"] for e in sisa], marker="s", color="tab:red",
                        label="SISA (s heads)", capsize=2)
        probe = system_entries(results, dataset, "probe")[0]
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


