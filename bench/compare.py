"""Forget cost of two code revisions measured side by side: is the code of this tree as fast as an older commit's?

The head code is the tree this module runs from (its working tree, committed or not); the base code is ``--base REV``,
checked out with ``git worktree add --detach`` into a temporary folder and removed at the end. Each code runs its own
``legonet`` CLI (``pipeline/cli/main.py`` or, before the restructure, ``stages/cli.py``) with ``PYTHONPATH`` set to
its root, so the DVC stages it starts run the same code. For every (code, dataset) a project is initialised with
``legonet init --data`` and built (``legonet build``) with bench.scale's settings; the builds run one after another,
not interleaved, so their ratio carries the machine's drift. Then rounds: in each, for each dataset, the same random
train sample and then the same ``--batch`` samples are forgotten (``legonet forget --profile``) in the base and the
head project, the code that goes first alternating by round, so a change of the shared machine's load hits both.
Reports per (dataset, size, code) the median over the rounds of the wall time, of its part outside the train stages
and of each phase, and the head/base ratios; writes ``bench/results/compare-<REV>.json``.

    python -m bench.compare --base REV [--data mnist5k,fashion70k] [--rounds 3] [--batch 100] [--workdir DIR]

``--workdir DIR`` keeps the projects: a later run reuses a project that DIR holds for the same code (the digest of
its pipeline/ and stages/ source) and settings, so the builds can run while the machine is busy (``--rounds 0``)
and the rounds later on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from bench.scale import Cli, _dataset, _list, build, dataset_frame, forget, phase_kinds, settings, train_ids
from bench.setting import code_digest, machine

REPO = Path(__file__).resolve().parent.parent
CODES = ("base", "head")
SOURCES = ("pipeline/**/*", "stages/**/*")  # what decides a project's bytes and a forget's path
CLI_MODULES = ("pipeline.cli.main", "stages.cli")  # where the CLI lives now, and before the restructure
TOLERANCE = 1.10  # head within 10 % of base
STATE = "compare-state.json"


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def code_cli(root: Path) -> Cli:
    """The CLI of the code checked out at ``root``, run with that root (only) on ``PYTHONPATH``."""
    module = next((m for m in CLI_MODULES if (root / (m.replace(".", "/") + ".py")).is_file()), None)
    if module is None:
        raise SystemExit(f"{root} holds no legonet CLI ({' or '.join(CLI_MODULES)})")
    return Cli((sys.executable, "-m", module), {**os.environ, "PYTHONPATH": str(root)})


def identity(root: Path) -> dict[str, str]:
    """The commit checked out at ``root`` and a digest of its legonet source as it is on disk (edits included)."""
    dirty = git("status", "--porcelain", "--", "pipeline", "stages", cwd=root)
    return {"revision": git("rev-parse", "HEAD", cwd=root) + ("-dirty" if dirty else ""),
            "source_sha256": code_digest(root, SOURCES)}


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """A detached worktree of ``rev`` for the length of the run."""
    folder = Path(tempfile.mkdtemp(prefix="legonet-base-"))
    git("worktree", "add", "--detach", str(folder), rev)
    try:
        yield folder
    finally:
        git("worktree", "remove", "--force", str(folder))
        shutil.rmtree(folder, ignore_errors=True)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def reusable(recorded: dict, code: dict[str, str], n: int, blocks: int) -> bool:
    """Was this kept project built by the same code (its source on disk: a commit that changes only bench/ keeps the
    projects) with the settings this run asks for?"""
    return (bool(recorded) and recorded["code"]["source_sha256"] == code["source_sha256"]
            and recorded["settings"] == settings(recorded["samples"], n, blocks, {}))


def prepare(workdir: Path, datasets: list[str], clis: dict[str, Cli], codes: dict[str, dict[str, str]], n: int,
            blocks: int, say: Callable[[str], None]) -> dict[str, dict]:
    """Every (code, dataset) project in ``workdir``: reused when the state file records it built by the same code
    with the same settings, else initialised and built afresh. Returns the state (per project: its code, settings,
    build seconds and whether this run reused it)."""
    state_file = workdir / STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    for name in datasets:
        data = workdir / f"{name}.parquet"
        frame = None
        for code in CODES:
            key, root = f"{code}/{name}", workdir / code / name
            recorded = state.get(key, {})
            if root.is_dir() and reusable(recorded, codes[code], n, blocks):
                state[key] = {**recorded, "reused": True}
                say(f"{key}: reusing the project built {recorded['built_at']} ({recorded['build_seconds']} s)")
                continue
            if frame is None:
                frame = dataset_frame(name)
                frame.to_parquet(data, index=False)
            shutil.rmtree(root, ignore_errors=True)
            root.parent.mkdir(parents=True, exist_ok=True)
            params = settings(len(frame), n, blocks, {})
            load = load_average()
            seconds = build(data, root, params, clis[code])
            state[key] = {"code": codes[code], "settings": params, "samples": len(frame),
                          "build_seconds": round(seconds, 2),
                          "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                          "load_average_before": load, "load_average_after": load_average(), "reused": False}
            state_file.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
            say(f"{key} ({len(frame)} samples): built in {seconds:.1f} s")
    return {k: v for k, v in state.items() if k.split("/")[1] in datasets}


def measure(workdir: Path, datasets: list[str], clis: dict[str, Cli], rounds: int, batch: int, seed: int,
            say: Callable[[str], None]) -> list[dict[str, object]]:
    """The interleaved rounds: per round and dataset the same samples forgotten in each code's project, the code that
    goes first alternating by round. One record per forget."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")  # request IDs unique across runs on kept projects
    rng = random.Random(f"{seed}-{stamp}")
    records: list[dict[str, object]] = []
    for request in range(rounds):
        order = CODES if request % 2 == 0 else CODES[::-1]
        for name in datasets:
            roots = {code: workdir / code / name for code in CODES}
            for count in (1, batch):
                ids = rng.sample(sorted(set.intersection(*(set(train_ids(r)) for r in roots.values()))), count)
                for position, code in enumerate(order):
                    record = forget(roots[code], ids, f"compare-{stamp}-{name}-{request}-{count}-{code}", clis[code])
                    records.append({"round": request, "data": name, "code": code, "position": position, **record})
                    say(f"round {request + 1}/{rounds}, {name}, forget of {count}, {code}: {record['seconds']} s "
                        f"({record['non_training_seconds']} s outside training), adapters "
                        f"{record['retrained_adapters']}")
    return records


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def summarize(records: list[dict]) -> list[dict[str, object]]:
    """Per (dataset, forget size): each code's medians (wall, outside training, every phase kind) and head/base."""
    rows = []
    for name, count in dict.fromkeys((r["data"], r["samples"]) for r in records):
        mine = {code: [r for r in records if (r["data"], r["samples"], r["code"]) == (name, count, code)]
                for code in CODES}
        medians = {}
        for code, forgets in mine.items():
            kinds = [phase_kinds(f["phases"]) for f in forgets]
            names = sorted({k for p in kinds for k in p})
            medians[code] = {"seconds": _median([f["seconds"] for f in forgets]),
                             "non_training_seconds": _median([f["non_training_seconds"] for f in forgets]),
                             "runs": [f["seconds"] for f in forgets],
                             "phases": {k: _median([p.get(k, 0.0) for p in kinds]) for k in names}}
        base, head = medians["base"], medians["head"]
        ratio = round(head["seconds"] / base["seconds"], 3)
        grown = {k: round(head["phases"].get(k, 0.0) - base["phases"].get(k, 0.0), 2)
                 for k in {*base["phases"], *head["phases"]}}
        rows.append({"data": name, "samples": count, **medians, "ratio": ratio,
                     "non_training_ratio": round(head["non_training_seconds"] / base["non_training_seconds"], 3),
                     "within_tolerance": ratio <= TOLERANCE,
                     "phase_growth_seconds": sorted(grown.items(), key=lambda kv: -kv[1])})  # a list: JSON keeps it
    return rows


def report(result: dict) -> list[str]:
    """The Markdown section docs/benchmarks.md shows for a ``compare-*.json``."""
    base, head = result["codes"]["base"], result["codes"]["head"]
    lines = [f"Command: `{result['command']}` ({result['date']}, {result['machine']['nproc']} CPUs; load average "
             f"{result['load_average_before']} before the rounds, {result['load_average_after']} after). Base: "
             f"{base['revision'][:12]} (`{base['cli']}`), head: {head['revision'][:12]} (`{head['cli']}`). Each round "
             "forgot the same random train sample(s) in the base and the head project, the code going first "
             "alternating by round; figures are medians over the rounds of the wall time of `legonet forget "
             "--profile`, *outside training* is that minus the wall time during which a `repro:train@*` stage ran.", "",
             f"| data | forget | base s | head s | head / base | outside training: base s, head s, head / base | "
             f"within {round((TOLERANCE - 1) * 100)} % |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['data']} | {r['samples']} | {r['base']['seconds']:.2f} | {r['head']['seconds']:.2f} | "
                     f"{r['ratio']:.3f} | {r['base']['non_training_seconds']:.2f}, "
                     f"{r['head']['non_training_seconds']:.2f}, {r['non_training_ratio']:.3f} | "
                     f"{'yes' if r['within_tolerance'] else 'no'} |")
    builds = result["builds"]
    lines += ["", "Builds (`legonet build`, one after another, not interleaved, so this ratio carries the machine's "
              "drift): " + "; ".join(
                  f"{name} base {builds[f'base/{name}']['build_seconds']:.1f} s, head "
                  f"{builds[f'head/{name}']['build_seconds']:.1f} s "
                  f"({builds[f'head/{name}']['build_seconds'] / builds[f'base/{name}']['build_seconds']:.2f}x)"
                  for name in dict.fromkeys(r["data"] for r in result["rows"])) + ".", "",
              "Phases (median seconds, base → head; `repro:*` are DVC stages, a `foreach`'s summed):", ""]
    columns = [(r, f"{r['data']} {r['samples']}") for r in result["rows"]]
    names = sorted({k for r, _ in columns for k in (*r["base"]["phases"], *r["head"]["phases"])},
                   key=lambda k: -max(max(r["base"]["phases"].get(k, 0.0), r["head"]["phases"].get(k, 0.0))
                                      for r, _ in columns))
    lines += ["| phase | " + " | ".join(label for _, label in columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {k} | " + " | ".join(f"{_phase(r['base'], k)} → {_phase(r['head'], k)}" for r, _ in columns) + " |"
              for k in names]
    return lines


def _phase(medians: dict, name: str) -> str:
    """A phase's median, or "-" where that code's ``--profile`` has no such phase."""
    return f"{medians['phases'][name]:.2f}" if name in medians["phases"] else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare this tree with")
    parser.add_argument("--data", type=_list(_dataset, "datasets (mnist5k, mnist1k, fashion70k, fashion280k)"),
                        default=["mnist5k", "fashion70k"])
    parser.add_argument("--n", type=int, default=32, help="adapters of every project")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of forgets; 0 builds the projects only")
    parser.add_argument("--batch", type=int, default=100, help="samples in the second forget of each round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="keep the projects here and reuse those built by the same code")
    parser.add_argument("--out", type=Path, help="default: bench/results/compare-<BASE>.json")
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench.compare", *(argv if argv is not None else sys.argv[1:])])
    say = partial(print, flush=True)
    base_commit = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    with checkout(base_commit) as base_root, tempfile.TemporaryDirectory(prefix="legonet-compare-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        roots = {"base": base_root, "head": REPO}
        clis = {code: code_cli(root) for code, root in roots.items()}
        codes = {code: identity(root) for code, root in roots.items()}
        say(f"# {command}\n# {datetime.now(UTC).isoformat(timespec='seconds')}: {os.cpu_count()} CPUs, load average "
            f"{load_average()}; projects in {workdir}\n"
            + "\n".join(f"# {code}: {c['revision']} (source sha256 {c['source_sha256'][:16]}), "
                        f"{' '.join(clis[code].prefix[1:])}" for code, c in codes.items()))
        builds = prepare(workdir, args.data, clis, codes, args.n, args.blocks, say)
        if args.rounds == 0:
            say("built; no rounds (--rounds 0)")
            return 0
        before = load_average()
        records = measure(workdir, args.data, clis, args.rounds, args.batch, args.seed, say)
        after = load_average()
    result = {"command": command, "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
              "codes": {code: {**c, "cli": " ".join(clis[code].prefix[1:])} for code, c in codes.items()},
              "n": args.n, "blocks": args.blocks, "batch": args.batch, "rounds": args.rounds,
              "load_average_before": before, "load_average_after": after, "builds": builds,
              "rows": summarize(records), "forgets": records}
    out = args.out or REPO / "bench/results" / f"compare-{args.base.replace('/', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print("\n".join(report(result)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
