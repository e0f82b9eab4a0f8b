"""duboko: deep learning from the primer to the cluster, on one engine.

The Python API (docs/api.md) is loaded on first use (PEP 562 module `__getattr__`), so that
`import duboko` stays light and this module imports nothing above the bottom layer:

    import duboko
    run = duboko.train("digits", out="runs/digits", epochs=2)
    run.metrics["test_accuracy"]
"""

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = ["recipes", "models", "create_model", "summary", "train", "load", "Run", "Summary", "default_run_dir"]

# Three API functions share their names with subpackages (duboko.train, duboko.models) or the
# recipes folder. Importing a subpackage sets the package's attribute to it, which would hide the
# function; so the package keeps, under such a name, one object that is both: calling it calls
# the API function, and every other attribute is the subpackage's (`duboko.train.engine`,
# `duboko.models.__path__`), so code and mocks that walk `duboko.train.x` keep working.
_SHARED_NAMES = ("train", "models", "recipes")


def _api() -> types.ModuleType:
    return importlib.import_module("duboko.api")


class _CallablePackage:
    """A subpackage that is also the API function of the same name."""

    def __init__(self, name: str, package: types.ModuleType):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_package", package)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(_api(), self._name)(*args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return getattr(_api(), self._name).__doc__

    @property
    def __signature__(self) -> Any:
        import inspect

        return inspect.signature(getattr(_api(), self._name))

    @property
    def __wrapped__(self) -> Any:
        return getattr(_api(), self._name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._package, attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(self._package, attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._package, attr)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._package)) | {"__call__"})

    def __repr__(self) -> str:
        return f"<duboko.{self._name}: the API function, and the package {self._package.__name__}>"


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHARED_NAMES and isinstance(value, types.ModuleType):
            value = _CallablePackage(name, value)  # the import system binding a subpackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    """The API's public names, imported on first use."""
    if name in __all__:
        api = _api()
        found = globals().get(name)  # importing the API imported (and wrapped) the subpackage
        return found if found is not None else getattr(api, name)
    raise AttributeError(f"module 'duboko' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
