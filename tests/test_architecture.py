"""The import graph holds the design's arrows (DESIGN.md: models -> export -> bundle -> runtime).

Every module's imports are parsed, function-local ones too, because a lazy import is still a
dependency: the runtime must install and run on a Jetson without models/ or export/ code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Folder -> import package, as pyproject.toml's package-dir maps them.
PACKAGES = {"edgeenc": "edgeenc", "models": "edgeenc.models", "export": "edgeenc.export", "runtime": "edgeenc.runtime"}

# (importer prefix, imported prefix, why it is forbidden)
FORBIDDEN = [
    ("edgeenc.runtime", "edgeenc.export", "the runtime reads bundles; it never reaches export code"),
    ("edgeenc.runtime", "edgeenc.models", "the runtime never reaches the PyTorch models"),
    ("edgeenc.models", "edgeenc.export", "models are upstream of export"),
    ("edgeenc.models", "edgeenc.runtime", "models are upstream of the runtime"),
]


def is_cli(module: str) -> bool:
    return module == "edgeenc.cli" or module.startswith("edgeenc.cli_")


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO_ROOT / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


MODULES = project_modules()


def resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].stem == "__init__"
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> list[tuple[str, str | None, int]]:
    """(imported project module, name taken from it or None, line) for every import in `module`."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("edgeenc")]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            if not target.startswith("edgeenc"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def private_attributes_of(module: str) -> list[str]:
    """`alias._name` where alias is a project module bound by an import in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            aliases.update({a.asname or a.name: f"{target}.{a.name}" for a in node.names
                            if f"{target}.{a.name}" in MODULES})
    return [f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
            and node.attr.startswith("_") and not node.attr.startswith("__")]


def graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in imports_of(module) if target in MODULES and target != module}
            for module in MODULES}


def test_every_project_import_resolves_to_a_module():
    unknown = [f"{m}:{line} imports {target}" for m in MODULES for target, _, line in imports_of(m)
               if target not in MODULES]
    assert not unknown, unknown


@pytest.mark.parametrize("importer_prefix, imported_prefix, why", FORBIDDEN)
def test_forbidden_arrows(importer_prefix, imported_prefix, why):
    bad = [f"{m}:{line} imports {target}" for m in MODULES if m.startswith(importer_prefix)
           for target, _, line in imports_of(m) if target.startswith(imported_prefix)]
    assert not bad, f"{why}: {bad}"


def test_library_never_imports_the_cli():
    bad = [f"{m}:{line} imports {target}" for m in MODULES if not is_cli(m)
           for target, _, line in imports_of(m) if is_cli(target)]
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = [f"{m}:{line} takes {name} from {target}" for m in MODULES
           for target, name, line in imports_of(m)
           if name and name.startswith("_") and not name.startswith("__") and target != m]
    bad += [use for m in MODULES for use in private_attributes_of(m)]
    assert not bad, bad


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_importing_the_runtime_pulls_no_export_or_models_module():
    # Every runtime module, imported in a child where torch cannot be imported at all.
    runtime = sorted(m for m in MODULES if m.startswith("edgeenc.runtime"))
    code = "\n".join([
        "import sys",
        "class Block:",
        "    def find_spec(self, name, path=None, target=None):",
        "        if name == 'torch' or name.startswith('torch.'):",
        "            raise ImportError('torch is blocked in this test')",
        "sys.meta_path.insert(0, Block())",
        *[f"import {m}" for m in runtime],
        "bad = sorted(m for m in sys.modules if m.startswith(('edgeenc.export', 'edgeenc.models', 'edgeenc.cli')))",
        "print(' '.join(bad))",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import edgeenc.runtime.* pulled: {proc.stdout.strip()}"
