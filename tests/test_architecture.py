"""The import rules of docs/architecture.md, enforced on the source (every import, including the ones
inside functions): floors only import their own floor or lower ones, the library knows nothing of
Prefect, MLflow stays where tracking and the registry live, and no stage imports another stage."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# docs/architecture.md, from the ground up. A package imports its own floor or lower, never higher.
FLOORS: dict[str, int] = {
    "components.storage": 0, "components.registry.uri": 0,  # the ground: objects; the pure source parser
    "components.config": 1, "components.environment": 1,
    "components.tracking": 2, "components.data": 2, "components.models": 2,
    "components.ssl": 3,
    "components.train": 4, "components.evaluate": 4, "components.curation": 4, "components.serving": 4,
    "components.distill": 5,
    "components.registry": 6,
    "components.stages": 7,
    "flows": 8,
}
# MLflow is imported only where runs and the registry are handled (and by the pyfunc runtime it serves).
MLFLOW_ALLOWED = ("components.tracking", "components.registry", "components.serving", "components.stages", "flows")
STAGE_SHARED = ("components.stages.context", "components.stages.catalog")


def package_of(module: str) -> str:
    """The FLOORS key a dotted module belongs to (the longest matching prefix)."""
    matches = [p for p in FLOORS if module == p or module.startswith(p + ".")]
    if not matches:
        raise KeyError(module)
    return max(matches, key=len)


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted([*(ROOT / "components").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every absolute import in the file, as (module, line), from any depth of the tree."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            # ``from components.registry import uri`` names a submodule: judge it as that module
            yield from ((f"{node.module}.{alias.name}", node.lineno) for alias in node.names
                        if node.module in ("components.registry",) and alias.name == "uri")


ALL = list(modules())


def test_every_package_has_a_floor() -> None:
    unplaced = [module for module, _ in ALL if not any(module == p or module.startswith(p + ".") for p in FLOORS)
                and module != "components"]
    assert not unplaced, f"place these in FLOORS and docs/architecture.md: {unplaced}"


def floor_violations(module: str, path: Path) -> list[str]:
    """Imports of ``path`` (as module ``module``) that reach a higher floor."""
    if module == "components":
        return []
    own = package_of(module)
    wrong = []
    for target, line in imports(path):
        if not target.startswith(("components.", "flows")) or target == "components":
            continue
        other = package_of(target)
        if FLOORS[other] > FLOORS[own]:
            wrong.append(f"{path}:{line} imports {target} (floor {FLOORS[other]} > {FLOORS[own]})")
    return wrong


def tool_violations(module: str, path: Path) -> list[str]:
    """Prefect imported by the library, or MLflow outside the floors that own runs and the registry."""
    wrong = []
    for target, line in imports(path):
        top = target.split(".")[0]
        if top == "prefect" and module.startswith("components"):
            wrong.append(f"{path}:{line}: components import prefect")
        if top == "mlflow" and not module.startswith(MLFLOW_ALLOWED):
            wrong.append(f"{path}:{line}: imports mlflow outside tracking / registry / serving / stages / flows")
    return wrong


@pytest.mark.parametrize(("module", "path"), ALL, ids=[m for m, _ in ALL])
def test_imports_follow_the_floors(module: str, path: Path) -> None:
    wrong = floor_violations(module, path)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("module", "path"), ALL, ids=[m for m, _ in ALL])
def test_library_knows_no_prefect_and_mlflow_stays_in_its_floors(module: str, path: Path) -> None:
    wrong = tool_violations(module, path)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("module", "path"), [(m, p) for m, p in ALL if m.startswith("components.stages.")],
                         ids=[m for m, _ in ALL if m.startswith("components.stages.")])
def test_no_stage_imports_another_stage(module: str, path: Path) -> None:
    others = [f"{path.relative_to(ROOT)}:{line} imports {target}" for target, line in imports(path)
              if target.startswith("components.stages.") and target != module and target not in STAGE_SHARED]
    assert not others, "\n".join(others)


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checks above can fail: a models module importing the registry (inside a function), MLflow or
    Prefect is reported; the pure source parser is the one registry module it may use."""
    bad = tmp_path / "bad.py"
    bad.write_text("from components.registry.uri import parse_source\n\n"
                   "def f():\n    from components.registry.resolve import resolve\n    import mlflow\n"
                   "    import prefect\n")
    floors = floor_violations("components.models.bad", bad)
    assert len(floors) == 1 and "components.registry.resolve (floor 6 > 2)" in floors[0]
    tools = tool_violations("components.models.bad", bad)
    assert sorted("prefect" if "import prefect" in t else "mlflow" for t in tools) == ["mlflow", "prefect"]
