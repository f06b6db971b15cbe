"""How far the pipeline's config travels: a static walk from ``kdray.pipeline.run_pipeline`` along ``cfg``.

    python bench/walk.py [--root kdray.pipeline:run_pipeline] [--names cfg] [--verbose]

Starting from the root function with ``cfg`` marked, the walk goes through each function's body in source order.
A name assigned a part of a marked one is marked too (``stage = cfg.teacher``, ``root = cfg.data.root``, or
what a method of it returns: ``cfg.stage("teacher")``). A call that passes a marked name or a part of one to a
function defined in kdray (resolved through the module's imports: ``from kdray.x import f``,
``x.f``, or a function of the same module) is followed, depth first, with the callee's matching parameters
marked. Entering a function of another module is a move; coming back to the caller's module after it is a move
back up. A function already on the walk's stack is not entered again (recursion).

It prints the modules visited, the moves, the moves back up, and how often each module was entered: the shape
of the data flow, which the architecture issue asked to flatten (docs/architecture.md). It reads the source;
nothing is imported or run.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Module:
    name: str
    functions: dict[str, ast.FunctionDef]
    imports: dict[str, str]  # local name -> "module" or "module:function"


@dataclass
class Walk:
    modules: dict[str, Module]
    moves: int = 0
    back_up: int = 0
    entered: Counter = field(default_factory=Counter)
    trail: list[str] = field(default_factory=list)


def load(package: str = "kdray") -> dict[str, Module]:
    modules = {}
    for path in sorted((REPO / package).rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        functions, imports = {}, {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(node.name, node)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    imports[alias.asname or alias.name] = target if target in _all_modules(package) else \
                        f"{node.module}:{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(package):
                        imports[alias.asname or alias.name.split(".")[-1]] = alias.name
        modules[name] = Module(name, functions, imports)
    return modules


def _all_modules(package: str) -> set[str]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for p in (REPO / package).rglob("*.py")}


def _mentions(node: ast.AST, marked: set[str]) -> bool:
    """Whether ``node`` is a marked name or a part of one: ``cfg``, ``cfg.data.root``, ``cfg.stage("teacher")``
    (a config's own method gives config); not what other code computes from it."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred, ast.Call)):
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Attribute):
            return False
        node = node.func if isinstance(node, ast.Call) else node.value
    return isinstance(node, ast.Name) and node.id in marked


def _callee(module: Module, call: ast.Call, walk: Walk) -> tuple[str, ast.FunctionDef] | None:
    func = call.func
    if isinstance(func, ast.Name):
        target = module.imports.get(func.id)
        for _ in range(5):  # through re-exports: ``from kdray.config_cli import dump_yaml`` in kdray.config
            if not (target and ":" in target):
                break
            mod, name = target.split(":")
            found = walk.modules.get(mod, Module(mod, {}, {}))
            fn = found.functions.get(name)
            if fn:
                return mod, fn
            target = found.imports.get(name)
        if target and ":" in target:
            return None
        fn = module.functions.get(func.id)
        return (module.name, fn) if fn else None
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        target = module.imports.get(func.value.id)
        if target and ":" not in target and target in walk.modules:
            fn = walk.modules[target].functions.get(func.attr)
            return (target, fn) if fn else None
    return None


def _marked_parameters(fn: ast.FunctionDef, call: ast.Call, marked: set[str]) -> set[str]:
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
    out = {p for p, arg in zip(params, call.args) if _mentions(arg, marked)}
    out |= {kw.arg for kw in call.keywords if kw.arg and _mentions(kw.value, marked)}
    return out


def visit(walk: Walk, module: str, fn: ast.FunctionDef, marked: set[str], stack: tuple) -> None:
    marked = set(marked)
    for node in _in_order(fn):
        if isinstance(node, ast.Assign) and _mentions(node.value, marked):
            marked |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Call) and (any(_mentions(a, marked) for a in node.args)
                                             or any(_mentions(k.value, marked) for k in node.keywords)):
            found = _callee(walk.modules[module], node, walk)
            if found is None or (found[0], found[1].name) in stack:
                continue
            callee_module, callee = found
            params = _marked_parameters(callee, node, marked)
            if not params:
                continue
            if callee_module != module:
                walk.moves += 1
                walk.entered[callee_module] += 1
                walk.trail.append(f"{module} -> {callee_module}.{callee.name}")
            visit(walk, callee_module, callee, params, stack + ((callee_module, callee.name),))
            if callee_module != module:
                walk.moves += 1
                walk.back_up += 1


def _in_order(fn: ast.FunctionDef):
    """The function's statements and calls in source order (nested functions excluded)."""
    nodes = [n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.Call)) and n is not fn]
    return sorted(nodes, key=lambda n: (n.lineno, n.col_offset))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="kdray.pipeline:run_pipeline")
    p.add_argument("--names", default="cfg", help="comma-separated names marked in the root")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args()
    module, name = a.root.split(":")
    walk = Walk(load())
    walk.entered[module] += 1
    visit(walk, module, walk.modules[module].functions[name], set(a.names.split(",")), ((module, name),))
    if a.verbose:
        print("\n".join(walk.trail))
    print(f"modules visited: {len(walk.entered)}; moves: {walk.moves}, of them back up: {walk.back_up}")
    print("entered: " + ", ".join(f"{m} {n}" for m, n in walk.entered.most_common()))


if __name__ == "__main__":
    sys.exit(main())
