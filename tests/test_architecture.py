"""The import graph holds the design's arrows: models -> export -> bundle -> runtime, and inside the runtime a
core with five wings (backends, recorder, archive, bench, probes) that reach each other only through faces.

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


WINGS = ("backends", "recorder", "archive", "bench", "probes")
# Wings that are parts of the product beside each other; backends is what every one of them runs on.
SIBLING_WINGS = ("recorder", "archive", "bench", "probes")


def project_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


MODULES = project_modules()


def resolve(importer: str, node: ast.ImportFrom, is_package: bool | None = None) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].stem == "__init__" if is_package is None else is_package
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def bound_names(package: str) -> set[str]:
    """Names a package's __init__ binds itself (imports, defs, assignments); empty for a plain module."""
    path = MODULES.get(package)
    if path is None or path.stem != "__init__":
        return set()
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def imports_of(module: str, source: str | None = None, is_package: bool | None = None
               ) -> list[tuple[str, str | None, int]]:
    """(imported project module, name taken from it or None, line) for every import in `module` (its file, or
    `source` for a probe module that is not on disk)."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source, filename=module)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("edgeenc")]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, is_package)
            if not target.startswith("edgeenc"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                # A face may bind a submodule's name to what it exports (recorder's `listen` is the function).
                if submodule in MODULES and alias.name not in bound_names(target):
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


def wing_of(module: str) -> str | None:
    """"core" for the runtime's core modules, the wing's name for a module inside one, None outside the runtime."""
    if module != "edgeenc.runtime" and not module.startswith("edgeenc.runtime."):
        return None
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[2] in WINGS else "core"


def wing_violations(module: str, imports: list[tuple[str, str | None, int]]) -> list[str]:
    """What `module` does against the runtime's shape: the core imports no wing but the backends' face, no wing
    imports a sibling, and nothing outside a wing reaches past its face (e.g. a concrete backend)."""
    mine, bad = wing_of(module), []
    for target, _, line in imports:
        theirs = wing_of(target)
        if theirs in (None, "core", mine):
            continue
        face = f"edgeenc.runtime.{theirs}"
        where = f"{module}:{line} imports {target}"
        if target != face:
            bad.append(f"{where}: past the face of {theirs}/ (import {face})")
        if mine == "core" and theirs != "backends":
            bad.append(f"{where}: the core imports a wing")
        if mine in SIBLING_WINGS and theirs in SIBLING_WINGS:
            bad.append(f"{where}: a wing imports another wing")
    return bad


def test_runtime_core_and_wings_keep_their_shape():
    bad = [v for m in MODULES for v in wing_violations(m, imports_of(m))]
    assert not bad, bad


def probe_violations(probe: str, source: str) -> list[str]:
    """`wing_violations` of a module named `probe` with the text `source`, as if it were in the tree."""
    MODULES[probe] = REPO_ROOT / "probe.py"  # only its name is used; `source` stands for its text
    try:
        return wing_violations(probe, imports_of(probe, source, is_package=False))
    finally:
        del MODULES[probe]


@pytest.mark.parametrize("probe, source, why", [
    ("edgeenc.runtime.probe", "from edgeenc.runtime.recorder import watch", "the core imports a wing"),
    ("edgeenc.runtime.probe", "from .bench import run_bench", "the core imports a wing"),
    ("edgeenc.runtime.probe", "from .backends.selection import select_backend", "past the face of backends/"),
    ("edgeenc.runtime.recorder.probe", "from ..archive import list_recordings", "a wing imports another wing"),
    ("edgeenc.runtime.bench.probe", "import edgeenc.runtime.recorder.store", "a wing imports another wing"),
    ("edgeenc.export.probe", "from edgeenc.runtime.backends.onnxruntime_backend import OrtBackend",
     "past the face of backends/"),
    ("edgeenc.cli_probe", "from edgeenc.runtime.backends import tensorrt_backend", "past the face of backends/"),
])
def test_the_shape_check_fails_on_a_probe_module(probe, source, why):
    assert any(why in v for v in probe_violations(probe, source)), probe_violations(probe, source)


@pytest.mark.parametrize("probe, source", [
    ("edgeenc.runtime.probe", "from .backends import select_backend"),  # the core through the backends' face
    ("edgeenc.runtime.bench.probe", "from ..backends import open_cpu_variant"),  # a wing through it too
    ("edgeenc.runtime.recorder.probe", "from ..encoder import Encoder\nfrom .store import Store"),
    ("edgeenc.export.probe", "from edgeenc.runtime.bench import time_interleaved"),
])
def test_the_shape_check_passes_what_the_design_allows(probe, source):
    assert probe_violations(probe, source) == []


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
