"""The legonet source a stage runs, found statically by name (the rule: ``pipeline.project.code``).

From the stage module, every name its code uses is followed through imports (those inside functions too) to the
module-level function, class or constant it stands for, and from there on; a module counts with all its bytes when
one of its definitions is reached, or when importing it runs more than definitions. Nothing is imported or run:
the source files are parsed, each once per process and file digest.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from pipeline.data.dataset import write_bytes_atomic
from pipeline.project.params import ParamsError
from pipeline.tracking.lineage import file_sha256

LEGONET_PACKAGES = ("pipeline", "stages")


@dataclass(frozen=True)
class _Target:
    """What an imported name stands for: a module, or a name inside one."""

    module: str
    name: str | None = None


@dataclass(frozen=True)
class _Statement:
    """What one top-level statement reads: the names its own imports bind, the modules they import, and the dotted
    names it uses (``np.load`` -> ("np", "load")); and the sha256 of its syntax tree (``definitions_digest``)."""

    imports: dict[str, _Target]
    imported: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]
    digest: str = ""


@dataclass
class _Module:
    name: str
    path: Path
    relpath: str  # path below the folder holding the top-level package: the same wherever the code is installed
    body: list[_Statement] = field(default_factory=list)  # every statement but the docstring (the stage module's)
    definitions: dict[str, list[_Statement]] = field(default_factory=dict)  # top-level name -> statements binding it
    bindings: dict[str, _Target] = field(default_factory=dict)  # top-level name -> what its import binds
    effects: list[_Statement] = field(default_factory=list)  # statements run at import that are not definitions
    imports: list[str] = field(default_factory=list)  # modules its top-level imports import


@lru_cache(maxsize=64)
def _package_dir(top: str) -> Path | None:
    spec = find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=4096)
def _locate(module: str) -> tuple[Path, Path] | None:
    """(source file, folder holding its top-level package) of a legonet module, or None when it is not one.

    Only the top-level package is looked up (``find_spec`` of a top-level name imports nothing), so finding a
    module never runs its code."""
    top = module.split(".")[0]
    package_dir = _package_dir(top) if top in LEGONET_PACKAGES else None
    if package_dir is None:
        return None
    base = package_dir.joinpath(*module.split(".")[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate, package_dir.parent
    return None


def _import_targets(node: ast.Import | ast.ImportFrom, package: str) -> dict[str, _Target]:
    """The names an import statement binds, each with what it binds (``import a.b`` binds ``a`` to module a)."""
    if isinstance(node, ast.Import):
        return {alias.asname or alias.name.split(".")[0]: _Target(alias.name if alias.asname else
                                                                  alias.name.split(".")[0])
                for alias in node.names}
    source = node.module or ""
    if node.level:
        parts = package.split(".")
        source = ".".join([*parts[:len(parts) - node.level + 1], *([source] if source else [])])
    found = {}
    for alias in node.names:
        if alias.name == "*":
            continue
        submodule = f"{source}.{alias.name}"
        found[alias.asname or alias.name] = (_Target(submodule) if _locate(submodule) is not None
                                             else _Target(source, alias.name))
    return found


def _imported_modules(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The modules an import statement imports (and so runs, if not yet imported)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    targets = _import_targets(node, package).values()
    return sorted({t.module for t in targets} or {node.module or package})


def _is_main_guard(node: ast.stmt) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _load(module: str) -> _Module | None:
    located = _locate(module)
    if located is None:
        return None
    path, root = located
    return _summarise(module, str(path), path.relative_to(root).as_posix(), file_sha256(path))


@lru_cache(maxsize=512)
def _summarise(module: str, path: str, relpath: str, digest: str) -> _Module:
    """A module's top-level statements, each read once; keyed by the file's digest, so an edit is read again."""
    tree = ast.parse(Path(path).read_bytes(), filename=path)
    found = _Module(module, Path(path), relpath)
    package = module if relpath.endswith("/__init__.py") else module.rpartition(".")[0]
    for index, node in enumerate(tree.body):
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        statement = _statement(node, package)
        found.body.append(statement)
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.bindings.update(statement.imports)
            found.imports += statement.imported
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.definitions.setdefault(node.name, []).append(statement)
        elif isinstance(node, ast.Assign | ast.AnnAssign) and all(
                isinstance(t, ast.Name) for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                found.definitions.setdefault(target.id, []).append(statement)
        elif not _is_main_guard(node):
            found.effects.append(statement)  # runs at import: a call, a try/if around imports, an attribute set
            found.bindings.update(statement.imports)
            for inner in ast.walk(node):
                if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                    found.definitions.setdefault(inner.id, []).append(statement)
    return found


def _statement(node: ast.stmt, package: str) -> _Statement:
    imports: dict[str, _Target] = {}
    imported: list[str] = []
    for inner in ast.walk(node):
        if isinstance(inner, ast.Import | ast.ImportFrom) and getattr(inner, "module", None) != "__future__":
            imports.update(_import_targets(inner, package))
            imported += _imported_modules(inner, package)
    refs = _References()
    refs.visit(node)
    return _Statement(imports, tuple(imported), tuple(refs.chains), hashlib.sha256(ast.dump(node).encode()).hexdigest())


class _References(ast.NodeVisitor):
    """The dotted names a piece of code reads (``np.load`` -> ("np", "load")), annotations left out: they are
    never evaluated (``from __future__ import annotations``) and decide nothing."""

    def __init__(self) -> None:
        self.chains: list[tuple[str, ...]] = []

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            chain.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name):
            self.chains.append((current.id, *reversed(chain)))
        else:
            self.visit(current)

    def visit_Name(self, node: ast.Name) -> None:
        self.chains.append((node.id,))

    def visit_arg(self, node: ast.arg) -> None:
        pass

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for child in (*node.decorator_list, node.args, *node.body):
            self.visit(child)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arguments(self, node: ast.arguments) -> None:
        for default in (*node.defaults, *(d for d in node.kw_defaults if d is not None)):
            self.visit(default)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)


class Reach:
    """The legonet files and the library modules one stage module's code reaches (module docstring)."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}  # path below the packages' folder -> file
        self.statements: set[tuple[str, str, str]] = set()  # (module, what: a name or "import", statement digest)
        self.libraries: set[str] = set()  # top-level import names
        self.trees: set[str] = set()  # packages whose every file is read as data
        self._imported: set[str] = set()
        self._reached: set[tuple[str, str]] = set()
        self._modules: dict[str, _Module | None] = {}

    def module(self, name: str) -> _Module | None:
        if name not in self._modules:
            self._modules[name] = _load(name)
        return self._modules[name]

    def root(self, name: str) -> None:
        """The stage module: run as ``__main__``, so every statement of it counts."""
        self.imported(name)
        found = self.module(name)
        if found is None:
            raise ParamsError(f"dvc.yaml: a stage runs `python -m {name}`, which is not a legonet module")
        self.files[found.relpath] = found.path
        for statement in found.body:
            self.visit(found, statement)

    def imported(self, name: str) -> None:
        """Importing a module runs its packages' and its own import-time statements."""
        if name in self._imported:
            return
        self._imported.add(name)
        parent = name.rpartition(".")[0]
        if parent:
            self.imported(parent)
        found = self.module(name)
        if found is None:
            return
        if found.effects:
            self.files[found.relpath] = found.path
            self.statements |= {(name, "import", node.digest) for node in found.effects}
            for node in found.effects:
                self.visit(found, node)
        for other in found.imports:
            if _locate(other) is not None:
                self.imported(other)

    def reach(self, module: str, name: str) -> None:
        if (module, name) in self._reached:
            return
        self._reached.add((module, name))
        self.imported(module)
        found = self.module(module)
        if found is None:
            return
        if name in found.definitions:
            self.files[found.relpath] = found.path
            self.statements |= {(module, name, node.digest) for node in found.definitions[name]}
            for node in found.definitions[name]:
                self.visit(found, node)
        elif name in found.bindings:  # a name the module imports and others import from it
            self.resolve(found.bindings[name], ())
        elif _locate(f"{module}.{name}") is not None:
            self.imported(f"{module}.{name}")

    def resolve(self, target: _Target, rest: tuple[str, ...]) -> None:
        if _locate(target.module) is None and target.module.split(".")[0] not in LEGONET_PACKAGES:
            self.library(target.module)
            return
        if target.name is not None:
            self.reach(target.module, target.name)
            return
        self.imported(target.module)
        if not rest:  # the module object itself is used: all of it
            found = self.module(target.module)
            for name in sorted(found.definitions) if found is not None else ():
                self.reach(target.module, name)
        elif rest[0] in ("__file__", "__path__"):
            self.trees.add(target.module)
        elif _locate(f"{target.module}.{rest[0]}") is not None:
            self.resolve(_Target(f"{target.module}.{rest[0]}"), rest[1:])
        else:
            self.reach(target.module, rest[0])

    def library(self, module: str) -> None:
        top = module.split(".")[0]
        if top and top not in sys.stdlib_module_names and top != "__future__":
            self.libraries.add(top)

    def visit(self, module: _Module, statement: _Statement) -> None:
        for other in statement.imported:
            if _locate(other) is not None:
                self.imported(other)
            else:
                self.library(other)
        for head, *rest in statement.chains:
            target = statement.imports.get(head) or module.bindings.get(head)
            if target is not None:
                self.resolve(target, tuple(rest))
            elif head in module.definitions:
                self.reach(module.name, head)


def _package_files(package: str) -> dict[str, Path]:
    """Every file of a package as it would be copied (``__pycache__`` left out), by path below its parent."""
    located = _locate(package)
    assert located is not None
    folder, base = located[0].parent, located[1]
    return {p.relative_to(base).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def legonet_digest(reach: Reach) -> str:
    files = dict(reach.files)
    for package in reach.trees:
        files.update(_package_files(package))
    listing = "".join(f"{relpath} {file_sha256(path)}\n" for relpath, path in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def definitions_digest(reach: Reach) -> str:
    """A digest of the definitions a reach followed, not of their files: the syntax tree of each statement that
    binds a reached name, and of each import-time statement of a module it imports (comments and layout left out).
    For a key narrower than a stage's: code elsewhere in the same files, which the stage's entry covers, does not
    change it. Packages read as files count with every file."""
    lines = [f"{module} {what} {digest}\n" for module, what, digest in sorted(reach.statements)]
    lines += [f"{relpath} file {file_sha256(path)}\n" for package in sorted(reach.trees)
              for relpath, path in sorted(_package_files(package).items())]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@lru_cache(maxsize=1)
def source_key() -> str:
    """A digest of every file of the legonet packages (path and bytes): a reach reads nothing else (``_locate``
    looks only there), so two equal keys give every stage the same digest. Once per process: the process runs the
    code it imported then."""
    listing = [f"{relpath} {file_sha256(path)}\n" for top in LEGONET_PACKAGES if _locate(top) is not None
               for relpath, path in sorted(_package_files(top).items())]
    return hashlib.sha256("".join(listing).encode()).hexdigest()


def stage_digest(module: str, memo: Path | None = None) -> str:
    """``legonet_digest`` of what ``python -m MODULE`` reaches; remembered in the JSON file ``memo`` under
    ``source_key()``, so that the forget's check of every stage and each stage's own check parse no source that
    has not changed since the last one (the memo is dropped whenever any legonet file changes)."""
    def compute() -> str:
        reach = Reach()
        reach.root(module)
        return legonet_digest(reach)

    return remembered(module, compute, memo)


def remembered(key: str, compute: Callable[[], str], memo: Path | None) -> str:
    """``compute()``, remembered in the JSON file ``memo`` under ``key`` for the source as it stands
    (``source_key()``): the memo holds digests of one source only."""
    source = source_key()
    known: dict[str, dict[str, str]] = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except ValueError:
            known = {}  # a torn or hand-edited memo: computed again and rewritten
    digests = known.get(source) if isinstance(known.get(source), dict) else None
    if digests is not None and isinstance(digests.get(key), str):
        return digests[key]
    digests = {**(digests or {}), key: compute()}
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(memo, (json.dumps({source: digests}, sort_keys=True) + "\n").encode())
    return digests[key]
