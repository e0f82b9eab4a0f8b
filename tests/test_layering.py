"""Lower layers never import higher ones (docs/architecture.md): blocks < models < engine < CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import duboko

ORDER = [
    {"errors", "registry", "config", "io", "precision", "__init__", "__version__"},
    {"nn"},
    {"models"},
    {"diffusion"},
    {"data"},
    {"evaluate"},
    {"tasks"},
    {"train"},
    {"bench"},
    {"cli", "__main__"},
]
# Discovery by name, done lazily inside functions (as timm's create_model finds registered
# models): the registry imports the model modules so that they register themselves, and the
# config imports the task classes named by a recipe to type-check its [data] section.
LAZY_DISCOVERY = {("registry.py", "duboko.models"), ("config.py", "duboko.tasks")}
ROOT = Path(duboko.__file__).parent


def _layer(parts: list[str]) -> int:
    for i, names in enumerate(ORDER):
        if parts[0] in names:
            return i
    raise AssertionError(f"module duboko.{'.'.join(parts)} is in no layer of docs/architecture.md")


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        own = _layer(list(rel))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "duboko"]
            for name in names:
                parts = name.split(".")
                if parts[0] != "duboko" or len(parts) < 2:
                    continue
                if _layer(parts[1:]) > own and ("/".join(rel) + ".py", name) not in LAZY_DISCOVERY:
                    bad.append(f"{'/'.join(rel)}.py imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
