"""The dependency rules of docs/architecture.md, read from the imports of every module with ``ast``.

Each rule is checked on every ``import`` statement of every module under ``src/polyclip``, the ones
inside functions included; a test fails with the module, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "polyclip"
DOC = ROOT / "docs" / "architecture.md"

# Subpackages built on the public API; the core is everything else but the CLI.
FEATURES = ("train", "eval", "index", "serve", "embed", "domains")
# Optional dependency -> the subpackages that may import it at module level.
OPTIONAL = {
    "faiss": ("index",),
    "fastapi": ("serve",),
    "uvicorn": ("serve",),
    "prometheus_client": ("serve",),
    "onnxruntime": ("serve",),
    "sklearn": ("eval",),
    "pyarrow": ("embed", "train"),
    "matplotlib": ("train", "eval"),
    "av": ("domains.clipbert",),
    "webdataset": ("train",),
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. polyclip.eval.bias
    target: str  # what it imports, e.g. polyclip.eval.errors or torch
    line: int
    top_level: bool  # at module level (not inside a function)

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[Import]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from polyclip import eval` names a module too
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if base == "polyclip"]
        else:
            continue
        found += [Import(name, target, node.lineno, id(node) not in in_function) for target in targets]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
IMPORTS = [imp for path in MODULES for imp in _imports(path)]


def _within(name: str, *packages: str) -> bool:
    return any(name == f"polyclip.{p}" or name.startswith(f"polyclip.{p}.") for p in packages)


def _polyclip_modules() -> set[str]:
    return {_module_name(path) for path in MODULES}


def _violations(rule) -> list[str]:
    return [str(imp) for imp in IMPORTS if rule(imp)]


def test_the_rules_see_every_module():
    assert len(MODULES) > 80
    assert any(imp.target == "torch" for imp in IMPORTS)
    assert any(not imp.top_level for imp in IMPORTS)  # imports inside functions are read too


def test_layers_and_models_import_nothing_else_from_polyclip():
    def rule(imp: Import) -> bool:
        return (
            (imp.module == "polyclip.layers" or _within(imp.module, "models"))
            and imp.target.startswith("polyclip")
            and not (imp.target == "polyclip.layers" or _within(imp.target, "models"))
        )

    assert _violations(rule) == []


def test_models_never_import_checkpoints():
    assert _violations(lambda imp: _within(imp.module, "models") and _within(imp.target, "checkpoints")) == []


def test_the_core_never_imports_the_subpackages_built_on_it():
    def rule(imp: Import) -> bool:
        core = not _within(imp.module, *FEATURES, "cli") and imp.module != "polyclip.__main__"
        return core and _within(imp.target, *FEATURES, "cli")

    assert _violations(rule) == []


def test_nothing_imports_the_cli():
    def rule(imp: Import) -> bool:
        return (
            _within(imp.target, "cli")
            and not _within(imp.module, "cli")
            and imp.module != "polyclip.__main__"
        )

    assert _violations(rule) == []


def test_optional_dependencies_only_where_they_are_needed():
    def rule(imp: Import) -> bool:
        top = imp.target.split(".")[0]
        return top in OPTIONAL and imp.top_level and not _within(imp.module, *OPTIONAL[top])

    assert _violations(rule) == []


def test_every_import_of_polyclip_names_a_module_that_exists():
    known = _polyclip_modules()
    stale = [
        str(imp)
        for imp in IMPORTS
        if imp.target.startswith("polyclip")
        and imp.target not in known
        and imp.target.rpartition(".")[0] not in known  # `from polyclip.x import name`
    ]
    assert stale == []


def test_the_architecture_page_names_every_module():
    text = DOC.read_text(encoding="utf-8")
    tree = text[text.index("```\nsrc/polyclip/") :]
    tree = tree[: tree.index("\n```", 4)]
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", tree))
    missing = [
        str(path.relative_to(PACKAGE))
        for path in MODULES
        if path.name != "__init__.py" and path.stem not in words
    ]
    assert missing == [], "docs/architecture.md does not name these modules"


@pytest.mark.parametrize("module", ["polyclip", "polyclip.cli"])
def test_importing_stays_light(module):
    """`import polyclip` and the CLI's import pull in neither torch nor any optional dependency."""
    heavy = ["torch", "numpy", "PIL", *OPTIONAL]
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
