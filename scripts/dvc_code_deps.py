"""The code dependencies of each DVC stage: the stage module's import closure inside the package.

    python scripts/dvc_code_deps.py            # same as --check
    python scripts/dvc_code_deps.py --check    # exit 1 naming each stage whose src/ deps differ
    python scripts/dvc_code_deps.py --write    # rewrite the src/ deps in dvc.yaml (comments kept)
    python scripts/dvc_code_deps.py --show     # print each stage's closure, module by module

A stage runs ``python -m virtual_biopsy.stages.NAME`` (through scripts/python.sh); everything that
command can execute from the package is a dependency: every module it imports, transitively,
including imports inside functions, ``importlib.import_module("...")`` literals and module names
held as strings (the ``vbiopsy`` COMMANDS table), and every package ``__init__.py`` on the way (an
import of ``virtual_biopsy.a.b`` runs ``virtual_biopsy/__init__.py`` and ``a/__init__.py``).
The analysis reads the source with ``ast`` and imports nothing, so it runs in a bare python3
(``--write`` needs ruamel.yaml, which DVC installs).

The deps written are exact: a file per module of the closure, or a folder when the closure
holds every module under it (a change in a module the stage cannot run never reruns it).
tests/test_architecture.py fails when dvc.yaml and this script disagree.
"""
from __future__ import annotations

import argparse
import ast
import io
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = "src"
PACKAGE = "virtual_biopsy"
STAGE_MODULE = re.compile(r"-m\s+(virtual_biopsy\.stages\.\w+)")
IMPORT_FUNCTIONS = {"import_module", "__import__"}


# ---------------------------------------------------------------------------------------------
# The package's modules and their imports
# ---------------------------------------------------------------------------------------------
def package_modules(repo: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file (relative to ``repo``) of every module of the package."""
    modules = {}
    for path in sorted((repo / SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(repo / SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if "__pycache__" not in parts:
            modules[".".join(parts)] = path.relative_to(repo)
    return modules


@dataclass(frozen=True)
class Import:
    """``importer`` can import ``target`` (a dotted name inside the package) at ``line``."""

    importer: str
    target: str
    line: int
    how: str  # import | from | import_module | string


def _is_package(module: str, modules: Mapping[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _resolve_relative(module: str, level: int, name: str | None, modules: Mapping[str, Path]) -> str:
    base = module.split(".") if _is_package(module, modules) else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def module_imports(module: str, modules: Mapping[str, Path], repo: Path = REPO) -> list[Import]:
    """Every import of a package module in ``module``'s source, wherever it sits (function bodies too).

    ``from X import a`` targets ``X.a`` when that is a module, else ``X``. A string constant that
    is exactly a module name of the package counts as an import (dynamic imports through a table,
    e.g. cli/main.py's COMMANDS); so does the literal argument of ``importlib.import_module``.
    Targets are returned even when no such module exists, so a caller can flag them.
    """
    tree = ast.parse((repo / modules[module]).read_text(), filename=str(modules[module]))
    found: list[Import] = []
    consumed: set[int] = set()  # string literals already counted as import_module arguments
    for node in ast.walk(tree):  # breadth first: a call comes before its arguments
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno, "import") for alias in node.names
                      if _in_package(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(module, node.level, node.module, modules) if node.level
                      else node.module or "")
            if not _in_package(source):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append(Import(module, sub if sub in modules else source, node.lineno, "from"))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if (name in IMPORT_FUNCTIONS and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and _in_package(node.args[0].value)):
                found.append(Import(module, node.args[0].value, node.lineno, "import_module"))
                consumed.add(id(node.args[0]))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules
              and id(node) not in consumed):
            found.append(Import(module, node.value, node.lineno, "string"))
    return found


def import_graph(modules: Mapping[str, Path], repo: Path = REPO) -> dict[str, set[str]]:
    """module -> the package modules it can import (unknown targets dropped)."""
    return {m: {i.target for i in module_imports(m, modules, repo) if i.target in modules} for m in modules}


def ancestors(module: str) -> list[str]:
    """The packages whose ``__init__`` runs before ``module``: a.b.c -> [a, a.b]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(start: str, graph: Mapping[str, set[str]]) -> set[str]:
    """Every package module that running ``start`` can execute."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [m for m in (*ancestors(module), *graph.get(module, ())) if m not in seen]
    return seen


def code_deps(modules_run: Iterable[str], modules: Mapping[str, Path]) -> list[str]:
    """The fewest paths covering exactly ``modules_run``: a folder when every module under it runs."""
    files = {modules[m].as_posix() for m in modules_run}
    all_files = {p.as_posix() for p in modules.values()}
    folders = sorted({str(Path(f).parent.as_posix()) for f in all_files}, key=lambda d: d.count("/"))
    covered: list[str] = []
    for folder in folders:  # shallow first, so a covered folder hides the folders inside it
        if any(folder.startswith(c + "/") for c in covered):
            continue
        under = {f for f in all_files if f.startswith(folder + "/")}
        if under <= files:
            covered.append(folder)
    loose = [f for f in files if not any(f.startswith(c + "/") for c in covered)]
    return sorted(covered + loose)


def covers(dep: str, file: str) -> bool:
    """Whether a DVC dep path (a file or a folder) covers ``file``."""
    dep = dep.rstrip("/")
    return file == dep or file.startswith(dep + "/")


# ---------------------------------------------------------------------------------------------
# dvc.yaml
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml as DVC runs it (``foreach``/``matrix`` expanded: name@item)."""

    name: str
    definition: str  # the key in dvc.yaml
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]  # dotted keys or sections of params.yaml

    @property
    def module(self) -> str | None:
        found = STAGE_MODULE.search(self.cmd)
        return found.group(1) if found else None

    @property
    def code_deps(self) -> tuple[str, ...]:
        return tuple(d for d in self.deps if covers(f"{SRC}/{PACKAGE}", d) or covers(d, f"{SRC}/{PACKAGE}"))


_INTERPOLATION = re.compile(r"\$\{\s*([\w.@-]+)\s*\}")


def _lookup(context: Mapping[str, Any], dotted: str) -> Any:
    value: Any = context
    for part in dotted.split("."):
        value = value[part]
    return value


def _interpolate(value: Any, context: Mapping[str, Any]) -> Any:
    """``${a.b}`` from ``context``; a value that is only one placeholder keeps its type (lists)."""
    if isinstance(value, str):
        whole = _INTERPOLATION.fullmatch(value.strip())
        if whole:
            try:
                return _lookup(context, whole.group(1))
            except (KeyError, TypeError):
                return value

        def one(match: re.Match) -> str:
            try:
                return str(_lookup(context, match.group(1)))
            except (KeyError, TypeError):
                return match.group(0)  # left as written: not a code path, nothing to resolve

        return _INTERPOLATION.sub(one, value)
    if isinstance(value, list):
        return [_interpolate(v, context) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, context) for k, v in value.items()}
    return value


def _names(entries: Iterable[Any]) -> tuple[str, ...]:
    """Paths of a deps list / keys of a params list (entries may be ``{path: options}`` mappings)."""
    out: list[str] = []
    for entry in entries or ():
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            for key, value in entry.items():
                # params: {file.yaml: [keys]} (another params file) or {key: options}
                out += [str(v) for v in value] if isinstance(value, list) else [str(key)]
    return tuple(out)


def _stage(name: str, definition: str, body: Mapping[str, Any]) -> Stage:
    cmd = body.get("cmd", "")
    return Stage(name, definition, " && ".join(cmd) if isinstance(cmd, list) else str(cmd),
                 _names(body.get("deps")), _names(body.get("params")))


def _item_name(item: Any) -> str:
    if isinstance(item, dict):
        return "-".join(str(v) for v in item.values())
    return str(item)


def dvc_stages(dvc_yaml: Mapping[str, Any], params: Mapping[str, Any]) -> Iterator[Stage]:
    """Every stage of a parsed dvc.yaml; ``foreach`` and ``matrix`` expanded with params.yaml."""
    for definition, body in (dvc_yaml.get("stages") or {}).items():
        if "foreach" in body:
            items = _interpolate(body["foreach"], params)
            if isinstance(items, str):  # unresolvable: one stand-in item keeps the code deps checked
                items = [items]
            pairs = items.items() if isinstance(items, dict) else ((_item_name(i), i) for i in items)
            for key, item in pairs:
                context = {**params, "item": item, "key": key}
                yield _stage(f"{definition}@{key}", definition, _interpolate(body["do"], context))
        elif "matrix" in body:
            axes = {axis: _interpolate(values, params) for axis, values in body["matrix"].items()}
            axes = {axis: values if isinstance(values, list) else [values] for axis, values in axes.items()}
            combos: list[dict[str, Any]] = [{}]
            for axis, values in axes.items():
                combos = [{**c, axis: v} for c in combos for v in values]
            template = {k: v for k, v in body.items() if k != "matrix"}
            for item in combos:
                yield _stage(f"{definition}@{_item_name(item)}", definition,
                             _interpolate(template, {**params, "item": item}))
        else:
            yield _stage(definition, definition, _interpolate(body, params))


def load_stages(repo: Path = REPO) -> list[Stage]:
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text()) if params_file.exists() else {}
    return list(dvc_stages(dvc_yaml, params or {}))


def stage_closures(repo: Path = REPO) -> dict[str, set[str]]:
    """Stage definition (dvc.yaml key) -> its import closure; stages that run no package module
    are left out."""
    modules = package_modules(repo)
    graph = import_graph(modules, repo)
    out = {}
    for stage in load_stages(repo):
        if stage.module is not None:
            out[stage.definition] = closure(stage.module, graph)
    return out


def expected_code_deps(repo: Path = REPO) -> dict[str, list[str]]:
    modules = package_modules(repo)
    return {definition: code_deps(run, modules) for definition, run in stage_closures(repo).items()}


def uncovered(stage: Stage, modules_run: Iterable[str], modules: Mapping[str, Path]) -> list[str]:
    """Files of the modules ``stage`` can run that none of its deps covers (stale-result bugs)."""
    return sorted(f for f in (modules[m].as_posix() for m in modules_run)
                  if not any(covers(d, f) for d in stage.deps))


def differences(repo: Path = REPO) -> list[str]:
    """One line per stage whose src/ deps in dvc.yaml are not exactly the generated ones."""
    modules = package_modules(repo)
    closures = stage_closures(repo)
    problems = []
    seen = set()
    for stage in load_stages(repo):
        if stage.definition in seen or stage.definition not in closures:
            continue
        seen.add(stage.definition)
        run = closures[stage.definition]
        wanted = code_deps(run, modules)
        if set(stage.code_deps) == set(wanted):
            continue
        run_files = {modules[m].as_posix() for m in run}
        missing = uncovered(stage, run, modules)
        not_run = sorted(f for f in (p.as_posix() for p in modules.values())
                         if f not in run_files and any(covers(d, f) for d in stage.code_deps))
        parts = [f"does not cover {missing}" if missing else "",
                 f"covers modules it never runs {not_run}" if not_run else "",
                 "" if missing or not_run else f"covers its closure, but not as generated: {wanted}"]
        problems.append(f"{stage.definition}: " + "; ".join(p for p in parts if p))
    return problems


def write(repo: Path = REPO) -> list[str]:
    """Rewrite the src/ deps of every stage in dvc.yaml (round trip: comments and layout kept);
    returns the stages changed."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    path = repo / "dvc.yaml"
    document = rt.load(path.read_text())
    expected = expected_code_deps(repo)
    changed = []
    for definition, body in document["stages"].items():
        if definition not in expected:
            continue
        block = body["do"] if "foreach" in body else body
        deps = block.get("deps")
        if deps is None:
            block["deps"] = deps = []
        keep = [d for d in deps if not (isinstance(d, str) and (covers(f"{SRC}/{PACKAGE}", d)
                                                                 or covers(d, f"{SRC}/{PACKAGE}")))]
        new = keep + expected[definition]
        if list(deps) != new:
            changed.append(definition)
            del deps[:]
            deps.extend(new)
    if changed:
        buffer = io.StringIO()
        rt.dump(document, buffer)
        path.write_text(buffer.getvalue())
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml's src/ deps differ (default)")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's src/ deps")
    mode.add_argument("--show", action="store_true", help="print each stage's import closure")
    parser.add_argument("--repo", type=Path, default=REPO, help="project root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.show:
        for definition, run in stage_closures(args.repo).items():
            print(f"{definition} ({len(run)} modules): {' '.join(sorted(run))}")
        return 0
    if args.write:
        changed = write(args.repo)
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed
              else "dvc.yaml: code deps up to date")
        return 0
    problems = differences(args.repo)
    for line in problems:
        print(f"dvc.yaml: {line}", file=sys.stderr)
    if problems:
        print("run: python scripts/dvc_code_deps.py --write", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
