"""The house rules of DESIGN.md §2 that a machine can check."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = {"prefect", "dvc", "dvclive", "flows", "tasks"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_xopd_core_imports_neither_orchestration_nor_upper_layers() -> None:
    offenders = {
        str(p.relative_to(REPO)): sorted(imported_roots(p) & FORBIDDEN_IN_CORE)
        for p in (REPO / "xopd_core").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tasks_never_import_flows() -> None:
    for p in (REPO / "tasks").rglob("*.py"):
        assert "flows" not in imported_roots(p), p


def test_mandated_top_level_exists_and_ci_runs_the_readme_test_command() -> None:
    for name in (
        "flows",
        "tasks",
        "xopd_core",
        "infra",
        "dvc.yaml",
        "params.yaml",
        "tests",
        "pyproject.toml",
        "README.md",
        "Makefile",
        ".ci/run",
        "CONTRIBUTING.md",
    ):
        assert (REPO / name).exists(), name
    assert "make test" in (REPO / "README.md").read_text()
    assert "make test" in (REPO / ".ci" / "run").read_text()
