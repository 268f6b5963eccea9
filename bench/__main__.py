"""``python -m bench``: run the benchmark (full, ``--quick`` or ``--smoke``) or re-render a report from its JSON."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.run import command_line, run
from bench.setting import MODES, REPO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="CI mode: bundled MNIST 5k only, small grids, 1 seed, a reduced real project (< 5 min)")
    mode.add_argument("--complete", action="store_const", dest="mode", const="complete",
                      help="the full grid, seeds and requests on every dataset (about 3x the default's training)")
    mode.add_argument("--smoke", action="store_const", dest="mode", const="smoke",
                      help="test mode: 1,000 MNIST digits, tiny grids, a real project on the same digits "
                           "(structure only, about 2 min)")
    parser.add_argument("--name", help="results name: bench/results/NAME.json (default: the mode)")
    parser.add_argument("--datasets", help="comma-separated subset of the mode's datasets")
    parser.add_argument("--seeds", type=int, help="seeds per accuracy figure (mode default)")
    parser.add_argument("--sequential", type=int, help="sequential single-sample requests (mode default)")
    parser.add_argument("--no-project", action="store_true", help="skip system 4 (the real DVC/MLflow project)")
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache", help="embedding/encoder cache")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--docs", type=Path, help="Markdown report (default: docs/benchmarks.md for the full mode, "
                                                  "else RESULTS_DIR/NAME.md)")
    parser.add_argument("--workdir", type=Path, help="where the temporary project is created (default: $TMPDIR)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished parts of an interrupted run with the same name and configuration")
    parser.add_argument("--rerun", default="", metavar="PARTS",
                        help="with --resume: measure these finished parts again (comma-separated, e.g. "
                             "mnist5k,project after a code change that affects them)")
    parser.add_argument("--prepare", action="store_true",
                        help="only export the encoders and encode the mode's datasets into the cache, then stop")
    parser.add_argument("--report", type=Path, metavar="RESULTS_JSON",
                        help="only re-render the Markdown and plots from an earlier results file")
    args = parser.parse_args(argv)
    rerun = [p for p in args.rerun.split(",") if p]
    if rerun and not args.resume:
        parser.error("--rerun needs --resume (it names finished parts of the run to measure again)")

    from bench.report import write_report

    if args.report is not None:
        import json

        results = json.loads(args.report.read_text())
        docs = args.docs or (REPO / "docs" / "benchmarks.md" if results["mode"] in ("full", "complete")
                             else args.report.with_suffix(".md"))
        print(f"wrote {write_report(results, args.report.parent, docs)}")
        return 0

    config = MODES[args.mode or "full"]
    if args.datasets:
        config = replace(config, datasets=[d for d in args.datasets.split(",") if d])
    if args.seeds is not None:
        config = replace(config, seeds=args.seeds)
    if args.sequential is not None:
        config = replace(config, sequential=args.sequential)
    if args.no_project:
        config = replace(config, project=False)
    name = args.name or config.mode
    docs = args.docs or (REPO / "docs" / "benchmarks.md" if config.mode in ("full", "complete")
                         else args.results_dir / f"{name}.md")

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    if args.prepare:
        from bench.run import Runner

        runner = Runner(config, args.cache, say)
        for dataset in config.datasets:
            _, info = runner.features(dataset)
            say(f"{dataset}: {info['samples']} samples cached in {info['embedding_cache']}")
        return 0
    say(f"bench: mode {config.mode}, datasets {config.datasets}, seeds {config.seeds}, results "
        f"{args.results_dir / (name + '.json')}")
    unknown = sorted(set(rerun) - {*config.datasets, *(["project"] if config.project else [])})
    if unknown:
        parser.error(f"--rerun {','.join(unknown)}: not a part of this run (parts: {', '.join(config.datasets)}"
                     f"{', project' if config.project else ''})")
    results = run(config, args.cache, args.results_dir, name, command_line(), say, args.workdir, args.resume,
                  rerun)
    report = write_report(results, args.results_dir, docs)
    say(f"done in {results['wall_seconds']:.0f} s: {args.results_dir / (name + '.json')}, {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
