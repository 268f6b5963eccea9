"""Scale benchmark: does a forget cost follow the work it touches, not the size of the model or of the data?

Two axes, measured side by side: the number of adapters (``--sizes``, n) and the size of the data (``--data``:
the default 5k digits, Fashion-MNIST 70k, ``fashion280k``, Fashion-MNIST four times over with new IDs, and
``fashion1m``, 15 times over with new IDs and a per-copy pixel: ``COPIES``; ``table5k`` and ``table1m`` are the same
images as a table of 49 pooled pixels, ``encoder: none``, for a million rows whose build fits a benchmark run:
``TABLES``). Every
(dataset, n) project is initialised with ``legonet init --data`` and built from scratch (``legonet build``, timed),
then measured in rounds: each round runs ``dvc status`` and a no-op ``dvc repro`` in every project, then
``legonet forget --profile`` of one random train sample in every project, then of ``--batch`` random train samples
(projects in turn, so a change in the shared machine's load hits all of them alike). Reports the median over the
rounds, each forget's phases, the forget/build ratios per dataset, the growth of the non-training part of a
1-sample forget across data sizes (against the smallest data of the same modality) and of each figure across n;
writes ``bench/results/scale.json``.

    python -m bench.scale [--data mnist5k,fashion70k] [--sizes 32] [--rounds 3] [--batch 100]

The reference split is 10 % of the data (the default) when that holds at least 4n samples, else 25 %: n keys need
n reference samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from bench.project import PROFILE_LINE

# n axis: the largest n against the smallest; data axis: the forget against the build of the same project
N_TARGETS = {"forget": 1.5, "build": 3.0, "status": 3.0, "noop_repro": 3.0}
DATA_TARGETS = {"forget_1_over_build": 1 / 30, "forget_batch_over_build": 1 / 5, "non_training_growth": 1.5}
# the default data, where fixed costs dominate: a 1-sample forget at most 1/10 of a build; at 280k the part of a
# 1-sample forget that is not training at most 1.2x that at 5k, and 100 samples at most 1/20 of the build (issue 24)
DATA_TARGET_OVERRIDES = {"mnist5k": {"forget_1_over_build": 1 / 10},
                         "fashion280k": {"non_training_growth": 1.2, "forget_batch_over_build": 1 / 20}}


def data_target(data: str, key: str) -> float:
    return DATA_TARGET_OVERRIDES.get(data, {}).get(key, DATA_TARGETS[key])


@dataclass(frozen=True)
class Cli:
    """How to run one code's ``legonet``: the command prefix and the environment it runs in. The default is the code
    this process imports; ``bench.compare`` runs another commit's code from its own checkout (``PYTHONPATH``)."""

    prefix: tuple[str, ...] = (sys.executable, "-m", "pipeline.cli.main")
    env: dict[str, str] | None = None

    def __call__(self, *args: str) -> list[str]:
        return [*self.prefix, *args]


HEAD = Cli()


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


# Fashion-MNIST over and over under new IDs: 280k as four exact copies (new IDs only), 1M (1,050,000) as 15 copies
# each with its own corner pixel, so no two copies share a payload (nor an embedding)
COPIES = {"fashion280k": (4, False), "fashion1m": (15, True)}
# Tables of pooled pixels: the first 5,000 Fashion-MNIST images, and fashion1m's 1,050,000 (a 1M image build is over
# an hour on 2 CPUs, most of it encoding; a table's build is the rest of the pipeline, so its forget is comparable)
TABLES = {"table5k": ("fashion70k", 5000), "table1m": ("fashion1m", None)}
POOL = 4  # 28 x 28 pixels -> 7 x 7 means


def dataset_frame(name: str) -> pd.DataFrame:
    """The samples of a benchmark dataset as a user's table (``COPIES`` for fashion280k and fashion1m, ``TABLES``)."""
    from bench.data import LOADERS

    if name in TABLES:
        source, rows = TABLES[name]
        return pooled(dataset_frame(source).iloc[:rows])
    count, pixel = COPIES.get(name, (1, False))
    frame = LOADERS["fashion70k" if count > 1 else name]().frame
    return frame if count == 1 else copies(frame, count, pixel)


def pooled(frame: pd.DataFrame) -> pd.DataFrame:
    """28 x 28 images as a table of ``POOL`` x ``POOL`` pixel means (49 float32 columns ``p00``..``p48``)."""
    pixels = np.frombuffer(b"".join(frame["image"]), dtype=np.uint8).reshape(len(frame), 28 // POOL, POOL,
                                                                             28 // POOL, POOL)
    means = pixels.mean(axis=(2, 4), dtype=np.float32).reshape(len(frame), -1)
    columns = {f"p{i:02d}": means[:, i] for i in range(means.shape[1])}
    return pd.DataFrame({"sample_id": frame["sample_id"].to_numpy(), "label": frame["label"].to_numpy(), **columns})


def copies(frame: pd.DataFrame, count: int, pixel: bool) -> pd.DataFrame:
    """``count`` copies of an image table, copy c with IDs suffixed ``-c<c>`` and, with ``pixel``, its first pixel
    set to c (copy 0 keeps its own)."""
    def copy(c: int) -> pd.DataFrame:
        out = frame.assign(sample_id=frame["sample_id"] + f"-c{c}")
        if pixel and c:
            out["image"] = [bytes([c]) + image[1:] for image in out["image"]]
        return out

    return pd.concat([copy(c) for c in range(count)], ignore_index=True)


def reference_fraction(samples: int, n: int) -> float:
    return 0.1 if 0.1 * samples >= 4 * n else 0.25


def settings(samples: int, n: int, blocks: int, extra: dict[str, str]) -> dict[str, object]:
    """The params every benchmark project is initialised with (``legonet init --set``)."""
    return {"adapters.n": n, "adapters.k": 3, "adapters.blocks": min(blocks, n),
            "data.reference_fraction": reference_fraction(samples, n), **extra}


def build(data: Path, root: Path, params: Mapping[str, object], cli: Cli = HEAD, secret: Path | None = None
          ) -> float:
    """`legonet init --data` + `legonet build` with these params (``secret``: another project's data secret, for a
    build that must equal it); the build's seconds."""
    timed(cli("init", str(root), "--data", str(data), *(["--data-secret", str(secret)] if secret else []),
              *[a for k, v in params.items() for a in ("--set", f"{k}={v}")]), root.parent, cli.env)
    return timed(cli("build"), root, cli.env)[0]


def status_and_noop(root: Path) -> tuple[float, float]:
    """One `dvc status` and one no-op `dvc repro` (asserted to do nothing)."""
    status, _ = timed([sys.executable, "-m", "dvc", "status"], root)
    noop, out = timed([sys.executable, "-m", "dvc", "repro"], root)
    assert "up to date" in out, out
    return status, noop


def train_ids(root: Path) -> list[str]:
    """The project's routed train sample IDs, sorted: what a benchmark forget picks from."""
    import pyarrow.parquet as pq  # pyarrow's parquet reader only where a project is read

    return sorted(pq.read_table(root / "data/routing.parquet", columns=["sample_id"]).column(0).to_pylist())


def forget(root: Path, sample_ids: list[str], request_id: str, cli: Cli = HEAD) -> dict[str, object]:
    """`legonet forget --profile` of these samples: wall time, phases, adapters retrained."""
    manifest = root.parent / f"{request_id}.json"
    manifest.write_text(json.dumps({"request_id": request_id, "sample_ids": sample_ids, "reason": "benchmark",
                                    "received_at": datetime.now(UTC).isoformat(timespec="seconds")}))
    seconds, out = timed(cli("forget", "--profile", str(manifest)), root, cli.env)
    phases = {m.group(1): float(m.group(2)) for m in map(PROFILE_LINE.match, out.splitlines()) if m}
    summary = json.loads(out.strip().splitlines()[-1])
    # the wall time during which a train stage ran: the two processes of a forget may train at once, so the stages'
    # summed seconds would overstate it (older code, without the figure: the sum, its stages ran one at a time)
    training = phases.get("repro:train-wall", sum(v for k, v in phases.items() if k.startswith("repro:train@")))
    return {"samples": len(sample_ids), "seconds": round(seconds, 2),
            "retrained_adapters": summary.get("retrained_adapters"),
            "train_stage_seconds": round(training, 2), "non_training_seconds": round(seconds - training, 2),
            "phases": phases, "load_average": [round(v, 2) for v in os.getloadavg()]}


def measure(datasets: list[str], sizes: list[int], blocks: int, batch: int, workdir: Path, seed: int, rounds: int,
            extra: dict[str, str], say: Callable[[str], None]) -> list[dict[str, object]]:
    """Build every (dataset, n) project, then measure in rounds that visit every project in turn; each figure is
    the median over the rounds."""
    configs = [(d, n) for d in datasets for n in sizes]
    roots, builds, samples = {}, {}, {}
    for name in datasets:
        frame = dataset_frame(name)
        samples[name] = len(frame)
        data = workdir / f"{name}.parquet"
        frame.to_parquet(data, index=False)
        for n in sizes:
            roots[name, n] = workdir / f"{name}-n{n}"
            builds[name, n] = build(data, roots[name, n], settings(samples[name], n, blocks, extra))
            say(f"{name} ({samples[name]} samples), n={n}: built in {builds[name, n]:.1f} s")
    checks: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
    forgets: dict[tuple[str, int], list[dict[str, object]]] = {c: [] for c in configs}
    rngs = {c: random.Random(f"{seed}-{c[0]}-{c[1]}") for c in configs}
    for request in range(rounds):
        for c in configs:
            checks[c].append(status_and_noop(roots[c]))
        for count in (1, batch):
            for c in configs:
                forgets[c].append(forget(roots[c], rngs[c].sample(train_ids(roots[c]), count),
                                         f"scale-{c[0]}-{c[1]}-{request}-{count}"))
                last = forgets[c][-1]
                say(f"round {request + 1}/{rounds}, {c[0]} n={c[1]}: forget of {count}: {last['seconds']} s "
                    f"({last['train_stage_seconds']} s in train stages), adapters {last['retrained_adapters']}")
    rows = []
    for c in configs:
        def median(key: str, count: int, c: tuple[str, int] = c) -> float:
            return round(statistics.median(f[key] for f in forgets[c] if f["samples"] == count), 2)

        rows.append({"data": c[0], "modality": "table" if c[0] in TABLES else "image", "samples": samples[c[0]],
                     "n": c[1], "blocks": min(blocks, c[1]),
                     "build_seconds": round(builds[c], 2),
                     "status_seconds": round(statistics.median(s for s, _ in checks[c]), 2),
                     "noop_repro_seconds": round(statistics.median(x for _, x in checks[c]), 2),
                     "forget_seconds": median("seconds", 1), "forget_non_training_seconds":
                     median("non_training_seconds", 1), "forget_batch_seconds": median("seconds", batch),
                     "batch": batch, "status_and_noop_runs": [[round(s, 2), round(x, 2)] for s, x in checks[c]],
                     "forgets": forgets[c],
                     "files": {d: sum(1 for p in (roots[c] / d).rglob("*") if p.is_file())
                               for d in ("data", "models")}})
    return rows


def verdicts(rows: list[dict[str, object]]) -> dict[str, object]:
    """Ratios and targets: per project the forget against its build; across n (same data) and data (same n)."""
    out: dict[str, object] = {"per_project": {}, "n_axis": {}, "data_axis": {}}
    for r in rows:
        out["per_project"][f"{r['data']} n={r['n']}"] = {
            "forget_1_over_build": round(r["forget_seconds"] / r["build_seconds"], 4),
            "forget_batch_over_build": round(r["forget_batch_seconds"] / r["build_seconds"], 4)}
    for data in dict.fromkeys(r["data"] for r in rows):
        same = [r for r in rows if r["data"] == data]
        if len(same) > 1:
            base = same[0]
            out["n_axis"][data] = {f"n={r['n']}": {k: round(r[f"{k}_seconds"] / base[f"{k}_seconds"], 2)
                                                   for k in N_TARGETS} for r in same}
    for n, modality in dict.fromkeys((r["n"], r.get("modality", "image")) for r in rows):
        same = sorted((r for r in rows if r["n"] == n and r.get("modality", "image") == modality),
                      key=lambda r: r["samples"])
        if len(same) > 1:
            base = same[0]
            out["data_axis"].setdefault(f"n={n}", {}).update({r["data"]: {
                "non_training_growth": round(r["forget_non_training_seconds"] / base["forget_non_training_seconds"],
                                             2),
                "build_growth": round(r["build_seconds"] / base["build_seconds"], 2)} for r in same})
    return out


def phase_kinds(phases: Mapping[str, float]) -> dict[str, float]:
    """A forget's ``--profile`` phases with the stages of one ``foreach`` summed (``repro:train@*``)."""
    by_kind: dict[str, float] = {}
    for name, seconds in phases.items():
        kind = name.split("@")[0] + ("@*" if "@" in name else "")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    return by_kind


def report(result: dict) -> list[str]:
    """The Markdown section docs/benchmarks.md shows for a ``scale.json``: per project its build, the median forgets
    and their ratios against the targets, then the phases of each 1-sample forget (median over the rounds)."""
    lines = [f"Command: `{result['command']}` ({result['date']}, {result['cpus']} CPUs). Each project was built from "
             "scratch (`legonet build`, timed once), then forgot in rounds, projects in turn, one random train "
             "sample and then a batch (wall time of `legonet forget --profile`, median over the rounds). Ratios "
             "are against the same project's build in the same run.", "",
             "| data | n | build s | forget 1 s (of it non-training) | forget 1 / build (target) | forget batch s | "
             "forget batch / build (target) | non-training growth vs smallest data of its modality (target) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = result["per_project"][f"{r['data']} n={r['n']}"]
        growth = result.get("data_axis", {}).get(f"n={r['n']}", {}).get(r["data"], {}).get("non_training_growth")
        lines.append(
            f"| {r['data']} ({r['samples']:,}) | {r['n']} | {r['build_seconds']:.1f} | {r['forget_seconds']:.1f} "
            f"({r['forget_non_training_seconds']:.1f}) | 1/{1 / ratio['forget_1_over_build']:.1f} "
            f"(1/{1 / data_target(r['data'], 'forget_1_over_build'):.0f}) | {r['forget_batch_seconds']:.1f} "
            f"({r['batch']} samples) | 1/{1 / ratio['forget_batch_over_build']:.1f} "
            f"(1/{1 / data_target(r['data'], 'forget_batch_over_build'):.0f}) | "
            + (f"{growth:.2f}x ({data_target(r['data'], 'non_training_growth')}x) |" if growth is not None
               else "- |"))
    lines += ["", "Phases of the 1-sample forgets (seconds, median over the rounds; `repro:*` are the DVC stages "
              "inside `rebuild`, the stages of one `foreach` summed):", ""]
    phases = []
    for r in result["rows"]:
        summed = [phase_kinds(f["phases"]) for f in r["forgets"] if f["samples"] == 1]
        phases.append((f"{r['data']} n={r['n']}",
                       {k: statistics.median(p.get(k, 0.0) for p in summed) for k in {k for p in summed for k in p}}))
    names = sorted({k for _, m in phases for k in m}, key=lambda k: -max(m.get(k, 0.0) for _, m in phases))
    lines += ["| phase | " + " | ".join(label for label, _ in phases) + " |",
              "|---|" + "---|" * len(phases)]
    lines += [f"| {name} | " + " | ".join(f"{m.get(name, 0.0):.2f}" for _, m in phases) + " |" for name in names]
    return lines


def _list(kind: Callable[[str], object], what: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            values = [kind(s) for s in text.split(",")]
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        return values
    return parse


def _adapters(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _dataset(text: str) -> str:
    from bench.data import LOADERS

    if text not in {*LOADERS, *COPIES, *TABLES} or text == "wordnet":
        raise KeyError(text)
    return text


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=["mnist5k", "fashion70k"], type=_list(
        _dataset, "datasets (mnist5k, mnist1k, fashion70k, fashion280k, fashion1m, table5k, table1m)"))
    parser.add_argument("--sizes", type=_list(_adapters, "adapter counts >= 1"), default=[32],
                        help="comma-separated adapter counts, e.g. 32,256,1024")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--batch", type=int, default=100, help="samples in the second forget of each round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of forgets (and status/no-op checks)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--set", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                        help="extra params for every project (e.g. a smaller encoder.image_size for a quick look)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench.scale", *(argv if argv is not None else sys.argv[1:])])
    print(f"# {command}\n# {datetime.now(UTC).isoformat(timespec='seconds')} on {platform.node()}: "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="legonet-scale-") as tmp:
        rows = measure(args.data, args.sizes, args.blocks, args.batch, Path(tmp), args.seed, args.rounds,
                       dict(args.set), lambda m: print(m, flush=True))
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "forgets"}), flush=True)
    result = verdicts(rows)
    print(json.dumps(result, indent=1, sort_keys=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"),
                                    "cpus": os.cpu_count(), "rows": rows, **result, "targets": {
                                        "n_axis": N_TARGETS, "data_axis": DATA_TARGETS,
                                        "data_axis_overrides": DATA_TARGET_OVERRIDES}},
                                   indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
