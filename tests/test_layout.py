"""The package's shape, read from its source: no import cycle between legonet's modules, and the forget's path from
the CLI to the signed record through the eight the README names ("Layout"), each handing off one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what every module may use without being a step of a flow: the error types, the file formats, the path names and
# the params loader
SHARED = {"pipeline", "pipeline.errors", "pipeline.data.dataset", "pipeline.project.layout", "pipeline.project.params",
          "pipeline.cli.output"}
FORGET_PATH = ["pipeline.cli.forget", "pipeline.forget.steps", "pipeline.forget.requests", "pipeline.forget.flow",
               "pipeline.runner.build", "pipeline.runner.worker", "pipeline.purge.pending", "pipeline.audit.record"]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str], top_level: bool) -> set[str]:
    """The legonet modules ``path`` imports (only at module level when ``top_level``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n in known}


def test_no_import_cycle_between_legonet_modules() -> None:
    found = modules()
    graph = {name: imports(path, set(found), top_level=True) - {name} for name, path in found.items()}
    cycles = []
    for start in graph:  # a path back to ``start`` through the graph, function-level imports included
        seen, stack = set(), [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append([*trail, start])
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_the_forget_path_is_the_eight_modules_the_readme_names() -> None:
    found = modules()
    reached = {}
    for name in ("pipeline.cli.forget", "pipeline.forget.steps"):  # the command and the state table it runs
        reached[name] = imports(found[name], set(found), top_level=False) - SHARED
    # `forget --defer` keeps requests for a later batch (pipeline.forget.defer) and writes no record
    on_path = ({"pipeline.cli.forget"} | reached["pipeline.cli.forget"] | reached["pipeline.forget.steps"]) - {
        "pipeline.forget.defer"}
    assert on_path <= set(FORGET_PATH), f"the forget's steps reach {sorted(on_path - set(FORGET_PATH))} too"
    assert on_path == set(FORGET_PATH) and len(FORGET_PATH) <= 8, sorted(on_path)
    readme = (ROOT / "README.md").read_text()
    for name in FORGET_PATH:  # the README's layout names each, so a reader can follow the path
        assert name.removeprefix("pipeline.").replace(".", "/") + ".py" in readme, name
