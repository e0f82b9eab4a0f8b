"""The package map of docs/architecture.md, enforced: each package imports only the packages its
row of `ALLOWED` names (a DAG), whatever the import's spelling.

Layers, bottom to top: core (errors, registry, config, io, precision, seeding, the package's
__init__) < nn < models < diffusion < data < evaluate < security < tasks < train < export < bench < api <
serve < cli / __main__.
The table is stricter than the order: the blocks (`nn`) and `data` never import `models`, and
`models` never imports `data`, `tasks`, `train`, `bench` or `cli`, although some of those sit
below others in the order.

The one way up is discovery by name, done lazily inside a function body (as timm's
`create_model` finds registered models): the registry imports the model and task modules so that
they register themselves. Such an import at module level, or in a class body, runs at import time
and is refused.

Every spelling counts: `import duboko.x`, `from duboko.x import y`, `from duboko import x`,
relative imports (`from . import x`, `from ..x import y`), and `importlib.import_module` /
`__import__`. A dynamic import (its target not a literal) must be inside a function, and the
dotted "duboko.x" strings of that module count as its targets.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import duboko

ROOT = Path(duboko.__file__).parent

# The bottom layer: imported by everything, importing only each other.
CORE = frozenset({"errors", "registry", "config", "io", "precision", "seeding", "__init__"})

# The documented order, bottom to top.
# (`python -m duboko`, __main__, only starts the CLI: it sits on top of it.)
ORDER = [CORE, {"nn"}, {"models"}, {"diffusion"}, {"data"}, {"evaluate"}, {"security"}, {"tasks"}, {"train"},
         {"export"}, {"bench"}, {"api"}, {"serve"}, {"cli"}, {"__main__"}]

# What each package (or top-level module of the bottom layer) may import, besides itself.
ALLOWED: dict[str, frozenset[str]] = {
    **{name: CORE for name in CORE},
    "nn": CORE,  # blocks: never models
    "models": CORE | {"nn"},  # never data, tasks, train, bench or cli
    "diffusion": CORE | {"nn", "models"},
    "data": CORE,  # never models (nor nn: data knows tensors, not layers)
    "evaluate": CORE | {"nn", "models", "diffusion", "data"},
    # attacks, poisoning, the model-file scanner: above evaluate, below the tasks that train with them
    "security": CORE | {"nn", "models", "diffusion", "data", "evaluate"},
    "tasks": CORE | {"nn", "models", "diffusion", "data", "evaluate", "security"},
    "train": CORE | {"nn", "models", "diffusion", "data", "evaluate", "security", "tasks"},
    "export": CORE | {"nn", "models", "diffusion", "data", "evaluate", "security", "tasks", "train"},  # ONNX, int8, HF GPT-2
    "bench": CORE | {"nn", "models", "diffusion", "data", "evaluate", "security", "tasks", "train", "export"},
    "api": CORE | {"nn", "models", "diffusion", "data", "evaluate", "security", "tasks", "train", "export", "bench"},  # import duboko
    # the web studio (FastAPI): over the whole library, under the CLI that starts it
    "serve": CORE | {"nn", "models", "diffusion", "data", "evaluate", "security", "tasks", "train", "export", "bench",
                     "api"},
    "cli": CORE | {"nn", "models", "diffusion", "data", "evaluate", "security", "tasks", "train", "export", "bench", "api",
                   "serve"},
    "__main__": CORE | {"cli"},
}

# Upward imports allowed only inside a function body: (importing package, imported package).
# The package's __init__ exposes duboko.api lazily (PEP 562 module __getattr__), so that
# `import duboko` stays light.
LAZY_DISCOVERY = frozenset({("registry", "models"), ("registry", "tasks"), ("__init__", "api")})

_DOTTED = re.compile(r"duboko(\.[A-Za-z_]\w*)+\.?")
_IMPORT_FUNCTIONS = {"import_module", "__import__"}


@dataclass(frozen=True)
class Import:
    target: str  # absolute module name, e.g. "duboko.nn.attention"
    line: int
    in_function: bool  # inside a def / async def (runs when called, not at import time)


def _top_level_names(root: Path) -> frozenset[str]:
    """The modules and packages directly under duboko/ ("errors", "nn", ...)."""
    modules = {p.stem for p in root.glob("*.py")}
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    return frozenset(modules | packages)


TOP_LEVEL = _top_level_names(ROOT)


def group_of(name: str) -> str | None:
    """The package of an absolute module name: "duboko.nn.attention" -> "nn", "duboko" or an
    attribute of the package (`from duboko import __version__`) -> "__init__"; None outside."""
    parts = name.split(".")
    if parts[0] != "duboko":
        return None
    if len(parts) == 1 or parts[1] not in TOP_LEVEL:
        return "__init__"
    return parts[1]


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """`from <level dots><target> import ...` inside `module` -> the absolute module name."""
    base = module.split(".") if is_package else module.split(".")[:-1]  # the current package
    if level - 1 > len(base) - 1:
        raise AssertionError(f"relative import beyond the top of the package in {module}")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a def at any depth; a class body alone is not (it runs at import time)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def _is_import_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in _IMPORT_FUNCTIONS


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import of a duboko module in `source` (the text of module `module`)."""
    tree = ast.parse(source)
    parents = _parents(tree)
    found: list[Import] = []
    dynamic: list[bool] = []  # for each import call with a computed target: inside a def?
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            # `from pkg import x`: x may be a submodule (duboko.nn) or a name in pkg.
            targets = [base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names]
        elif _is_import_call(node):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                targets = [arg.value]
            else:
                dynamic.append(_in_function(node, parents))
        targets = [t for t in targets if group_of(t) is not None]
        if targets:
            inside = _in_function(node, parents)
            found += [Import(t, node.lineno, inside) for t in targets]
    if dynamic:
        # The module imports by computed names: the dotted names it spells out are its targets,
        # imported lazily only if every such import is inside a function.
        lazy = all(dynamic)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
                found.append(Import(node.value.rstrip("."), node.lineno, lazy))
        if not lazy:
            found.append(Import("<dynamic import at module level>", 0, False))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `module` against `ALLOWED`, as readable lines (empty: all fine)."""
    own = group_of(module)
    if own not in ALLOWED:
        return [f"{module} is in no package of docs/architecture.md (add it to ALLOWED)"]
    bad = []
    for imp in imports_of(source, module, is_package):
        if imp.target.startswith("<"):
            bad.append(f"{module}: {imp.target} (computed imports must run inside a function)")
            continue
        target = group_of(imp.target)
        if target == own or target in ALLOWED[own]:
            continue
        if (own, target) in LAZY_DISCOVERY and imp.in_function:
            continue
        where = "at import time" if (own, target) in LAZY_DISCOVERY else "not allowed"
        bad.append(f"{module}:{imp.line} imports {imp.target} ({own} -> {target}: {where})")
    return bad


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(ROOT).with_suffix("").parts
    is_package = rel[-1] == "__init__"
    parts = rel[:-1] if is_package else rel
    return ".".join(("duboko", *parts)), is_package


def test_every_module_imports_only_what_its_package_may():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        module, is_package = _module_name(path)
        bad += violations(path.read_text(encoding="utf-8"), module, is_package)
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_every_package_is_in_the_table():
    assert TOP_LEVEL <= set(ALLOWED), f"not in ALLOWED: {sorted(TOP_LEVEL - set(ALLOWED))}"


def _layer(name: str) -> int:
    return next(i for i, names in enumerate(ORDER) if name in names)


def test_the_table_only_points_down_the_order():
    """The table is the order with edges taken out, never added: so it is a DAG (the core
    modules, one layer, aside)."""
    up = [f"{pkg} -> {dep}" for pkg, deps in ALLOWED.items() for dep in deps if _layer(dep) > _layer(pkg)]
    across = [f"{pkg} -> {dep}" for pkg, deps in ALLOWED.items() for dep in deps
              if _layer(dep) == _layer(pkg) and pkg not in CORE]
    assert not up and not across, up + across
    assert {name for names in ORDER for name in names} == set(ALLOWED)


# ---------------------------------------------------------------------------------------------
# The checker on made-up sources.


def test_checker_refuses_a_lazy_import_that_is_not_lazy():
    module_level = "import duboko.models\n"
    class_body = "class Finder:\n    from duboko.models import cnn\n"
    in_function = "def load():\n    import duboko.models\n    from duboko import tasks\n"
    in_method = "class Finder:\n    def load(self):\n        from duboko.tasks import seq2seq\n"
    assert violations(module_level, "duboko.registry") == [
        "duboko.registry:1 imports duboko.models (registry -> models: at import time)"
    ]
    assert len(violations(class_body, "duboko.registry")) == 1
    assert violations(in_function, "duboko.registry") == []
    assert violations(in_method, "duboko.registry") == []
    # Only the registry has the exception; a lazy import elsewhere is still against the table.
    assert len(violations(in_function, "duboko.config")) == 2


def test_checker_resolves_every_spelling():
    def targets(source: str, module: str, is_package: bool = False) -> list[str]:
        return [imp.target for imp in imports_of(source, module, is_package)]

    assert targets("from duboko import models, __version__\n", "duboko.data.text") == [
        "duboko.models", "duboko.__version__"
    ]
    assert group_of("duboko.__version__") == "__init__" and group_of("torch.nn") is None
    assert targets("from . import cnn\n", "duboko.models.mlp") == ["duboko.models.cnn"]
    assert targets("from .attention import MLP\n", "duboko.nn", is_package=True) == ["duboko.nn.attention.MLP"]
    assert targets("from ..models import cnn\n", "duboko.data.text") == ["duboko.models.cnn"]
    assert targets("import importlib\nimportlib.import_module('duboko.train')\n", "duboko.nn.x") == ["duboko.train"]
    # data -> models is refused although data sits above models in the order; so are the
    # relative and the package-attribute spellings.
    for source in ("import duboko.models.cnn\n", "from ..models import cnn\n", "from duboko import models\n"):
        assert violations(source, "duboko.data.text"), source
    assert violations("from duboko.nn import attention\n", "duboko.models.cnn") == []
    assert violations("from duboko.data import mnist\n", "duboko.models.cnn")
    assert violations("from duboko.models import cnn\n", "duboko.nn.attention")


def test_checker_follows_dynamic_imports():
    lazy = 'import importlib\nPACKAGE = "duboko.models"\ndef load():\n    importlib.import_module(PACKAGE)\n'
    eager = 'import importlib\nPACKAGE = "duboko.models"\nimportlib.import_module(PACKAGE)\n'
    assert violations(lazy, "duboko.registry") == []
    assert len(violations(eager, "duboko.registry")) == 2  # the target, and the module-level call
    assert violations(lazy, "duboko.data.text")  # not the registry: against the table
