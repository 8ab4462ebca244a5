"""The layers of dags/ (docs/architecture.md): arrows only go down, and nothing goes round.

``make lint`` runs import-linter on the contracts in pyproject.toml. These tests add what a
contract cannot say once for every future module, from the same import graph (grimp, which
import-linter builds on): no cycle between any two modules, a workflow's data and model modules
import neither ``common``, MLflow nor Airflow, and the DAG files import only the layer below them.
One test plants a back-arrow in a copy of the tree and checks that ``lint-imports`` refuses it.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
WORKFLOWS = ("power", "tick", "image")
# A workflow's modules that speak to MLflow and the Airflow/MLflow layer (common); every other
# module of the package is data, model or training code and must run without either.
MLFLOW_SIDE = {"pipeline", "cli", "pyfunc"}
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    sys.path.insert(0, str(DAGS))
    try:
        return grimp.build_graph("common", "scripts", "upstream", include_external_packages=True, cache_dir=None)
    finally:
        sys.path.remove(str(DAGS))


def _internal(graph: grimp.ImportGraph) -> dict[str, set[str]]:
    ours = {m for m in graph.modules if m.split(".")[0] in ("common", "scripts", "upstream")}
    return {m: {i for i in graph.find_modules_directly_imported_by(m) if i in ours} for m in ours}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan: the components with more than one module (each holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_any_two_modules(graph):
    """Lazy imports inside functions count: they are arrows too."""
    edges = _internal(graph)
    edges = {m: {i for i in imported if i != m and not m.startswith(i + ".")} for m, imported in edges.items()}
    assert strongly_connected(edges) == []


def test_workflow_packages_exist_and_the_flat_modules_are_gone():
    for workflow in WORKFLOWS:
        assert (DAGS / "scripts" / workflow / "__init__.py").is_file()
        assert (DAGS / "scripts" / workflow / "pipeline.py").is_file()
        assert (DAGS / "scripts" / workflow / "cli.py").is_file()
    assert sorted(p.name for p in (DAGS / "scripts").glob("*.py")) == ["__init__.py"]


def test_data_and_model_modules_import_neither_common_mlflow_nor_airflow(graph):
    offenders = []
    for module in sorted(graph.modules):
        parts = module.split(".")
        if len(parts) < 3 or parts[0] != "scripts" or parts[1] not in WORKFLOWS or parts[2] in MLFLOW_SIDE:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] in ("common", "mlflow", "airflow"):
                offenders.append(f"{module} -> {imported}")
    assert offenders == []


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level?) for every import of a file, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            ours = node.module.split(".")[0] in ("scripts", "common")
            names = [f"{node.module}.{alias.name}" if ours else node.module for alias in node.names]
            found += [(name, id(node) in top) for name in names]
    return found


@pytest.mark.parametrize("dag_file", sorted(p.name for p in DAGS.glob("*.py") if p.name != "airflow_local_settings.py"))
def test_dag_files_import_only_the_layer_below(dag_file):
    """At parse time: airflow.sdk (and the HITL operator), common and the standard library (cheap
    to parse). Inside a task:
    the workflow's pipeline, the shared core, common. Never a workflow's data or model module:
    the pipeline is the one door into a workflow."""
    bad = []
    for module, at_top in _imports(DAGS / dag_file):
        root = module.split(".")[0]
        if root == "airflow":
            # and the human-in-the-loop operator (approval), which only the standard provider has
            ok = (module == "airflow.sdk" or module.startswith("airflow.sdk.")
                  or module == "airflow.providers.standard.operators.hitl")
        elif root == "common":
            ok = True
        elif root == "scripts":
            parts = module.split(".")
            ok = not at_top and (parts[1:2] == ["core"] or (parts[1] in WORKFLOWS and parts[2:3] == ["pipeline"]))
        else:
            ok = root in sys.stdlib_module_names or root in ("__future__", "pendulum")
        if not ok:
            bad.append(f"{module} ({'module level' if at_top else 'in a task'})")
    assert bad == []


@pytest.mark.timeout(120)
def test_lint_imports_refuses_a_planted_back_arrow(tmp_path):
    """The contracts are not vacuous: the real tree passes, and the same tree with one arrow
    against the layers (the shared core importing the registry) fails, naming it."""
    tree = tmp_path / "dags"
    shutil.copytree(DAGS, tree, ignore=shutil.ignore_patterns("__pycache__"))
    config = ROOT / "pyproject.toml"

    def lint() -> subprocess.CompletedProcess:
        return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(config)], cwd=tree,
                              env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=100)

    clean = lint()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    errors = tree / "scripts" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _back_arrow():\n    from common import registry  # noqa\n")
    broken = lint()
    assert broken.returncode != 0
    assert "scripts.core.errors -> common.registry" in broken.stdout
