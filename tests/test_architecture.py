"""The module layers of docs/architecture.md, enforced: no import cycle, no upward import.

Every ``import`` counts, including those inside functions (they are read from the source with
``ast``, not from ``sys.modules``). A module may import its own layer or any layer below it;
the import graph as a whole must be acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdray", "cluster", "jobs", "serve")

#: Bottom to top. Keep in step with the drawing in docs/architecture.md.
LAYERS: list[tuple[str, set[str]]] = [
    ("contracts", {"kdray", "kdray.config", "kdray.config_cli", "kdray.storage", "kdray.schemas", "kdray.ray_private",
                   "kdray.pinning", "kdray.ingress"}),
    ("core", {"kdray.images", "kdray.reason_words", "kdray.dicom_results", "kdray.dicomweb", "kdray.codestreams", "kdray.inputs", "kdray.data", "kdray.models", "kdray.losses", "kdray.metrics", "kdray.checkpoints",
              "kdray.raycluster", "kdray.uncertainty", "kdray.runner", "kdray.train"}),
    ("predictor", {"kdray.predictor_base", "kdray.torch_predictor", "kdray.predictor"}),
    ("artifacts, explanations and Ray Data glue", {"kdray.export", "kdray.explain", "kdray.batch", "kdray.shard_scorer",
                                                   "kdray.scoring_engines"}),
    ("stages", {"kdray.evaluate", "kdray.calibrate", "kdray.logit_cache", "kdray.score", "kdray.report",
                "kdray.listener"}),
    ("pipeline", {"kdray.pipeline"}),
    # Above the library: the local S3, the local multi-node Ray and the demo data are for entry points and tests.
    ("local services", {"cluster.*"}),
    ("entry points", {"jobs.*", "serve.*"}),
]
#: Modules that must not import Ray at all (they run anywhere: a phone-side predictor, a notebook).
NO_RAY = {"kdray.listener", "kdray.pinning", "kdray.ingress", "kdray.images", "kdray.dicom_results", "kdray.dicomweb", "kdray.codestreams", "kdray.inputs", "kdray.models", "kdray.losses", "kdray.metrics", "kdray.schemas", "kdray.predictor",
          "kdray.predictor_base", "kdray.torch_predictor", "kdray.explain", "kdray.report",
          "kdray.reason_words"}
#: Imports that are forbidden even though the layers would allow them.
FORBIDDEN = {("kdray.train", "kdray.logit_cache")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module → every module it imports (any depth in the file), as absolute dotted names."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in files else base)
        graph[name] = {d for d in deps if d != name}
    return graph


def layer_of(module: str) -> int | None:
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".*") and module.startswith(member[:-1])) \
                    or (member.endswith(".*") and module == member[:-2]):
                return index
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, as a path that returns to its start; None if acyclic."""
    white, grey, black = 0, 1, 2
    colour = {m: white for m in graph}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        colour[module] = grey
        stack.append(module)
        for dep in sorted(graph[module]):
            if dep not in graph:
                continue
            if colour[dep] == grey:
                return stack[stack.index(dep):] + [dep]
            if colour[dep] == white and (cycle := visit(dep)):
                return cycle
        stack.pop()
        colour[module] = black
        return None

    for module in sorted(graph):
        if colour[module] == white and (cycle := visit(module)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, deps in sorted(graph.items()):
        mine = layer_of(module)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if theirs is not None and mine is not None and theirs > mine:
                problems.append(f"{module} ({LAYERS[mine][0]}) imports {dep} ({LAYERS[theirs][0]}): upward")
            if (module, dep) in FORBIDDEN:
                problems.append(f"{module} imports {dep}: forbidden")
            if module in NO_RAY and (dep == "ray" or dep.startswith("ray.")):
                problems.append(f"{module} imports {dep}: this module must not import Ray")
    return problems


# ----------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_every_module_has_a_layer(graph):
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"place these modules in a layer (tests/test_architecture.py, docs/architecture.md): {unplaced}"


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_or_forbidden_import(graph):
    assert layer_violations(graph) == []


def test_the_library_never_imports_the_local_services(graph):
    """The local S3, the local multi-node Ray and the demo data serve entry points and tests, not the product."""
    found = sorted(f"{m} imports {d}" for m, deps in graph.items() if m.split(".")[0] == "kdray"
                   for d in deps if d.split(".")[0] == "cluster")
    assert not found, found


IMPORT_CHANGES_NOTHING = """
import os, sys
before = dict(os.environ)
import kdray, kdray.images, kdray.config, kdray.storage, kdray.runner, kdray.raycluster
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
assert not changed, f"importing kdray changed the environment: {changed}"
assert "ray" not in sys.modules, "importing kdray imported Ray"
"""


def test_importing_kdray_changes_nothing():
    """No environment variable set and Ray not imported (so no Ray setting touched): the loopback setting is
    made by init_ray, right before a local Ray starts. Run without that setting, which kdray once set."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHANGES_NOTHING], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_architecture_doc_draws_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    drawing = doc[doc.index("## Layers"):doc.index("Never:")]
    for _, members in LAYERS:
        for member in members:
            assert member.removesuffix(".*").rsplit(".", 1)[-1] in drawing, member


# ----------------------------------------------------------------------------- the checker itself


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path)


def test_checker_finds_a_cycle_held_apart_by_a_lazy_import(tmp_path):
    graph = _tree(tmp_path, {
        "kdray/__init__.py": "",
        "kdray/evaluate.py": "from kdray.predictor import Predictor\n",
        "kdray/predictor.py": "def f():\n    from kdray import evaluate\n",
        "jobs/__init__.py": "", "serve/__init__.py": "",
    })
    assert find_cycle(graph) == ["kdray.evaluate", "kdray.predictor", "kdray.evaluate"]


def test_checker_finds_upward_imports_ray_in_pure_modules_and_relative_imports(tmp_path):
    graph = _tree(tmp_path, {
        "kdray/__init__.py": "",
        "kdray/pipeline.py": "def f():\n    from serve.app import deploy\n",
        "kdray/metrics.py": "import ray.data\n",
        "kdray/storage.py": "from cluster.local.s3 import LocalS3\n",
        "cluster/__init__.py": "", "cluster/local/__init__.py": "", "cluster/local/s3.py": "from kdray import KdrayError\n",
        "kdray/train.py": "from . import logit_cache\n",
        "kdray/logit_cache.py": "",
        "jobs/__init__.py": "", "serve/__init__.py": "", "serve/app.py": "",
    })
    problems = layer_violations(graph)
    assert any(p.startswith("kdray.pipeline (pipeline) imports serve.app") for p in problems)
    assert any(p.startswith("kdray.metrics imports ray.data") for p in problems)
    assert any(p.startswith("kdray.storage (contracts) imports cluster.local.s3 (local services)") for p in problems)
    assert any(p.startswith("kdray.train (core) imports kdray.logit_cache (stages)") for p in problems)
    assert find_cycle(graph) is None
