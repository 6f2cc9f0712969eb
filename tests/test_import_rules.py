"""The dependency rules of the layout, read from the source: core never imports a feature package,
and no module of library/ or networks/ imports itself back through others (type-only imports count)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("library.models", "library.data", "library.training")
FEATURES = ("library.distill", "library.ffn_compression", "library.resize")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for top in ("library", "networks") for path in (ROOT / top).rglob("*.py")}


def imported_names(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    return {name for name in imported_names(path) if name in modules}


def is_within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def test_the_walk_sees_the_packages_it_checks():
    modules = project_modules()
    for package in CORE + FEATURES:
        assert package in modules and any(name.startswith(package + ".") for name in modules)
    # The walk finds a known import, so an empty result below means no import, not a blind walk.
    assert "library.models.stable_diffusion" in project_imports(modules["library.training.model_setup"], modules)


@pytest.mark.parametrize("package", CORE)
def test_core_never_imports_a_feature_package(package):
    modules = project_modules()
    offending = {
        name: sorted(i for i in project_imports(path, modules) if is_within(i, FEATURES))
        for name, path in modules.items()
        if is_within(name, (package,))
    }
    assert {name: imports for name, imports in offending.items() if imports} == {}


# Within core, dependencies point down: training -> data -> models.
LOWER_CORE = {"library.models": ("library.data", "library.training"), "library.data": ("library.training",)}


@pytest.mark.parametrize("package", sorted(LOWER_CORE))
def test_lower_core_packages_never_import_the_ones_above(package):
    modules = project_modules()
    offending = {
        name: sorted(i for i in project_imports(path, modules) if is_within(i, LOWER_CORE[package]))
        for name, path in modules.items()
        if is_within(name, (package,))
    }
    assert {name: imports for name, imports in offending.items() if imports} == {}


# Scripts at kohya's paths (``python networks/resize_lora.py``, ``networks/merge_lora.py``, ...) that run our
# library: tools, not network modules, so kohya users never copy them into a checkout.
NETWORK_SCRIPTS = (
    "networks.resize_lora",
    "networks.merge_lora",
    "networks.svd_merge_lora",
    "networks.extract_lora_from_models",
    "networks.check_lora_weights",
)


def test_network_modules_import_nothing_from_library():
    modules = project_modules()
    offending = {
        name: sorted(i for i in imported_names(path) if i == "library" or i.startswith("library."))
        for name, path in modules.items()
        if is_within(name, ("networks",)) and name not in NETWORK_SCRIPTS
    }
    assert {name: imports for name, imports in offending.items() if imports} == {}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_library_or_networks_imports_itself_back():
    modules = project_modules()
    # A package's __init__ naming its own modules is how a package is built, not a cycle.
    graph = {
        name: {i for i in project_imports(path, modules) if i != name and not i.startswith(name + ".")}
        for name, path in modules.items()
    }
    assert find_cycle(graph) is None
