"""A static guard: nothing in src/duboko unpickles (pickles can run code on load).

The check parses every module and resolves names the way Python would (aliases, `from`
imports, `import a.b`, plain re-bindings `f = pickle.loads`, `getattr(pickle, "loads")`), so
that `import pickle as pk; pk.loads(b)` or `from torch.jit import load` are seen as what they
are. Flagged: the pickle family's loaders, `marshal`/`shelve`/`dill`/`joblib`/`cloudpickle`
altogether, `torch.load` unless called with `weights_only=True`, `torch.jit.load`,
`torch.package`, `numpy.load(allow_pickle=...)` unless `allow_pickle=False`, `pandas.read_pickle`,
and dynamic imports of any of those modules. Its own tests below run it on crafted snippets.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# Modules never to be used at all (each one's loaders unpickle or unmarshal code objects).
FORBIDDEN_MODULES = {"marshal", "shelve", "dill", "joblib", "cloudpickle", "_pickle", "cPickle", "torch.package"}
# Names that unpickle when used (called, passed around or subclassed).
FORBIDDEN_NAMES = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "pickle._Unpickler", "pickle._load", "pickle._loads",
    "torch.jit.load", "torch.serialization.load", "torch._weights_only_unpickler",
    "pandas.read_pickle", "numpy.lib.format.read_array",
    "copyreg", "torch.hub.load", "torch.hub.load_state_dict_from_url",
}
# Names that are safe only with a keyword set to a constant.
CONDITIONAL = {"torch.load": ("weights_only", True), "numpy.load": ("allow_pickle", False)}


def _forbidden(name: str) -> bool:
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return bool(prefixes & FORBIDDEN_MODULES) or any(name == f or name.startswith(f + ".") for f in FORBIDDEN_NAMES)


class _Checker(ast.NodeVisitor):
    def __init__(self, where: str):
        self.where = where
        self.aliases: dict[str, str] = {}  # local name -> dotted name it stands for
        self.findings: list[str] = []
        self.call_funcs: set[int] = set()

    # -- names ---------------------------------------------------------------------------------
    def resolve(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id if node.id in ("pickle", "torch", "numpy") else None)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):  # getattr(pickle, "loads"), importlib.import_module("pickle")
            func = self.resolve(node.func) or (node.func.id if isinstance(node.func, ast.Name) else None)
            args = node.args
            if func == "getattr" and len(args) >= 2 and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
                base = self.resolve(args[0])
                return f"{base}.{args[1].value}" if base else None
            if func in ("importlib.import_module", "__import__") and args and isinstance(args[0], ast.Constant) \
                    and isinstance(args[0].value, str):
                return args[0].value
        return None

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(f"{self.where}:{getattr(node, 'lineno', 0)}:{what}")

    # -- bindings --------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _forbidden(alias.name):
                self.flag(node, f"import {alias.name}")
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:  # `import torch.jit` binds `torch`
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = ("." * node.level) + (node.module or "")
        for alias in node.names:
            full = f"{module}.{alias.name}" if module else alias.name
            if alias.name == "*":
                if _forbidden(module) or module in ("pickle", "torch.jit", "torch.serialization"):
                    self.flag(node, f"from {module} import *")
                continue
            if _forbidden(full) or (full in CONDITIONAL):
                # A conditional name imported bare is checked where it is called.
                if full not in CONDITIONAL:
                    self.flag(node, f"from {module} import {alias.name}")
            self.aliases[alias.asname or alias.name] = full

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        target = self.resolve(node.value)
        for t in node.targets:
            if isinstance(t, ast.Name) and target:
                self.aliases[t.id] = target

    # -- uses --------------------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        name = self.resolve(node.func)
        self.call_funcs.add(id(node.func))
        if name in CONDITIONAL:
            key, safe = CONDITIONAL[name]
            value = next((k.value for k in node.keywords if k.arg == key), None)
            has_star = any(k.arg is None for k in node.keywords)
            ok = isinstance(value, ast.Constant) and value.value is safe and not has_star
            if name == "numpy.load" and value is None and not has_star:
                ok = True  # numpy's default is allow_pickle=False
            if not ok:
                self.flag(node, f"{name}(...) without {key}={safe}")
        elif name and _forbidden(name):
            self.flag(node, f"{name}(...)")
        else:
            resolved = self.resolve(node)  # a dynamic import or getattr of a forbidden name
            if resolved and (_forbidden(resolved) or resolved in CONDITIONAL):
                self.flag(node, f"dynamic {resolved}")
        self.generic_visit(node)

    def _reference(self, node: ast.AST) -> None:
        if id(node) in self.call_funcs:
            return
        name = self.resolve(node)
        if name and (_forbidden(name) or name in CONDITIONAL):
            self.flag(node, f"reference to {name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._reference(node)
        if id(node) not in self.call_funcs:
            # Only the outermost attribute of a chain is a reference (`torch.jit.load` once).
            self.call_funcs.add(id(node.value))
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and node.id in self.aliases:
            self._reference(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases:  # class Mine(pickle.Unpickler)
            name = self.resolve(base)
            if name and _forbidden(name):
                self.flag(node, f"subclass of {name}")
            self.call_funcs.add(id(base))
        self.generic_visit(node)


def find_unpickling(source: str, where: str = "<snippet>") -> list[str]:
    """Every unpickling construct in `source` as 'where:line:what'."""
    checker = _Checker(where)
    tree = ast.parse(source)
    # Two passes: bindings first (an import at the bottom of a module still binds its names).
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            checker.visit(node)
    imports_only = list(checker.findings)
    checker.findings = []
    checker.visit(tree)
    return sorted(set(imports_only + checker.findings))


# ---------------------------------------------------------------------------------------------
# The checker on crafted snippets.

UNSAFE = {
    "module call": "import pickle\npickle.loads(b)",
    "alias": "import pickle as pk\npk.loads(b)",
    "from import": "from pickle import loads\nloads(b)",
    "from import alias": "from pickle import load as L\nL(f)",
    "Unpickler": "import pickle\npickle.Unpickler(f).load()",
    "Unpickler subclass": "import pickle\nclass U(pickle.Unpickler):\n    pass",
    "rebinding": "import pickle\nf = pickle.loads\nf(b)",
    "getattr": "import pickle\ngetattr(pickle, 'loads')(b)",
    "dynamic import": "import importlib\nimportlib.import_module('marshal')",
    "__import__": "__import__('dill')",
    "torch.load bare": "import torch\ntorch.load(p)",
    "torch.load false": "import torch\ntorch.load(p, weights_only=False)",
    "torch.load variable": "import torch\ntorch.load(p, weights_only=flag)",
    "torch.load kwargs": "import torch\ntorch.load(p, **kw)",
    "torch.load alias": "import torch as T\nT.load(p, map_location='cpu')",
    "from torch import load": "from torch import load\nload(p)",
    "torch.load passed around": "import torch\nloader = torch.load\nloader(p, weights_only=True)",
    "torch.jit.load": "import torch\ntorch.jit.load(p)",
    "from torch.jit import load": "from torch.jit import load\nload(p)",
    "from torch import jit": "from torch import jit\njit.load(p)",
    "import torch.jit": "import torch.jit\ntorch.jit.load(p)",
    "numpy allow_pickle": "import numpy as np\nnp.load(p, allow_pickle=True)",
    "from numpy import load": "from numpy import load\nload(p, allow_pickle=True)",
    "marshal": "import marshal\nmarshal.loads(b)",
    "shelve": "import shelve\nshelve.open(p)",
    "dill": "import dill as d\nd.loads(b)",
    "joblib": "from joblib import load\nload(p)",
    "pandas": "import pandas as pd\npd.read_pickle(p)",
    "torch.package": "from torch.package import PackageImporter\nPackageImporter(p)",
    "cPickle": "import _pickle\n_pickle.loads(b)",
}
SAFE = {
    "exception class": "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass",
    "dumps": "import pickle\npickle.dumps(x)",
    "weights_only": "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "numpy default": "import numpy as np\nnp.load(p)",
    "numpy explicit": "import numpy as np\nnp.load(p, allow_pickle=False)",
    "json": "import json\njson.loads(s)",
    "own load": "def load(p):\n    return p\nload(1)",
    "safetensors": "from safetensors.torch import load\nload(b)",
    "torch save": "import torch\ntorch.save(x, p)",
}


@pytest.mark.parametrize("name", sorted(UNSAFE))
def test_checker_flags(name):
    assert find_unpickling(UNSAFE[name]), f"{name}: not flagged:\n{UNSAFE[name]}"


@pytest.mark.parametrize("name", sorted(SAFE))
def test_checker_passes(name):
    assert find_unpickling(SAFE[name]) == [], name


# ---------------------------------------------------------------------------------------------
# The package.

# The one allowed loader: import-weights' PyTorch restricted unpickler (weights_only=True).
ALLOWED_TORCH_LOAD = ["train/verify.py"]


def test_no_unpickling_anywhere_in_the_package():
    import duboko

    root = Path(duboko.__file__).parent
    findings, torch_loads = [], []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        source = path.read_text(encoding="utf-8")
        findings += find_unpickling(source, rel)
        tree = ast.parse(source)
        if any(isinstance(n, ast.Attribute) and n.attr == "load" and isinstance(n.value, ast.Name) and n.value.id == "torch"
               for n in ast.walk(tree)):
            torch_loads.append(rel)
    print(f"checked {len(list(root.rglob('*.py')))} modules; torch.load(weights_only=True) in {torch_loads}")
    assert findings == [], findings
    assert set(torch_loads) <= set(ALLOWED_TORCH_LOAD), torch_loads
