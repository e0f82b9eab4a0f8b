"""Registries of models and tasks, in the manner of timm's `register_model` / `create_model`.

Every model family registers named variants here. A variant is a model class, its typed config
dataclass and the overrides that make the variant (``gpt-tiny`` is ``GPT(GPTConfig(n_layer=2, ...))``).
The config is saved with each checkpoint, so ``build_model(name, config_dict)`` rebuilds the model.

Every task (a family's contract with the engine, `duboko.tasks.Task`) registers itself with the
`@register_task` decorator under its `name`, the name a recipe's ``task`` gives.

Both are discovered by name: the first look-up imports every module of `duboko/models/` and the
task's module of `duboko/tasks/` (or all of them), so a new family is one new file and nothing
else is edited. A model or task defined outside the package registers when its module is imported.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duboko.errors import DubokoError, unknown_name


@dataclass
class ModelSpec:
    name: str  # registry name, e.g. "my_net"
    family: str  # "cnn", "mlp", "rnn", "transformer", "unet", ...
    model_cls: type[nn.Module]  # built as model_cls(config)
    config_cls: type  # a @dataclass whose fields are the model's hyper-parameters
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides that define this variant
    description: str = ""  # one line, shown by `duboko models`
    # Builds an example input batch (a tuple of positional args) for summary/gradcheck.
    example_input: Callable[[Any, int], tuple] | None = None


def register_model(
    name: str,
    *,
    family: str,
    config_cls: type,
    model_cls: type[nn.Module] | None = None,
    description: str = "",
    example_input: Callable[[Any, int], tuple] | None = None,
    **defaults: Any,
) -> Any:
    """Register a named model variant. Re-registering a name is a programming error.

    With `model_cls` it registers at once and returns the `ModelSpec`; without it, it is a class
    decorator (``@register_model("tiny", family="cnn", config_cls=TinyConfig)``)."""

    def add(cls: type[nn.Module]) -> ModelSpec:
        if name in _MODELS.entries:
            raise ValueError(f"model {name!r} is already registered")
        spec = ModelSpec(name, family, cls, config_cls, dict(defaults), description, example_input)
        _MODELS.entries[name] = spec
        return spec

    if model_cls is not None:
        return add(model_cls)

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        add(cls)
        return cls

    return decorator


class _Discovered:
    """Entries by name, with their modules imported on the first look-up.

    `package` is where the built-in entries live; a module there registers its entries when
    imported. The import happens here, lazily (inside these methods), so that `duboko --help`
    stays fast and lower layers never import the registry's users. `name_to_module` says which
    module a name lives in, so one look-up imports one module instead of all of them."""

    def __init__(self, kind: str, package: str, name_to_module: Callable[[str], str] | None = None):
        self.kind = kind
        self.package = package
        self.name_to_module = name_to_module
        self.entries: dict[str, Any] = {}
        self.all_imported = False

    def _import_all(self) -> None:
        if not self.all_imported:
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
            self.all_imported = True

    def _import_for(self, name: str) -> None:
        if self.name_to_module is not None and not self.all_imported:
            module = self.name_to_module(name)
            if module.isidentifier() and importlib.util.find_spec(f"{self.package}.{module}") is not None:
                importlib.import_module(f"{self.package}.{module}")
        if name not in self.entries:
            self._import_all()

    def names(self) -> list[str]:
        self._import_all()
        return sorted(self.entries)

    def get(self, name: Any) -> Any:
        if isinstance(name, str) and name not in self.entries:
            self._import_for(name)
        if not isinstance(name, str) or name not in self.entries:
            self._import_all()
            raise unknown_name(self.kind, name, sorted(self.entries))
        return self.entries[name]


_MODELS = _Discovered("model", "duboko.models")
# A task's module is named after it: image-classification -> tasks/image_classification.py.
_TASKS = _Discovered("task", "duboko.tasks", name_to_module=lambda name: name.replace("-", "_"))


def model_names() -> list[str]:
    return _MODELS.names()


def get_spec(name: str) -> ModelSpec:
    return _MODELS.get(name)


def config_fields(spec: ModelSpec) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(spec.config_cls)}


def make_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config for a variant: dataclass defaults, then the variant's, then `overrides`."""
    spec = get_spec(name)
    values = {**spec.defaults, **(overrides or {})}
    known = config_fields(spec)
    bad = [k for k in values if k not in known]
    if bad:
        raise DubokoError(
            f"model {name!r} has no field {bad[0]!r}; valid fields: {', '.join(sorted(known))}"
        )
    from duboko.config import build_dataclass  # the same typed coercion as a recipe's [model]

    return build_dataclass(spec.config_cls, values, "model")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; unknown names fail with the list of known ones."""
    spec = get_spec(name)
    config = make_config(name, overrides)
    try:
        return spec.model_cls(config)
    except ValueError as exc:
        raise DubokoError(f"cannot build model {name!r}: {exc}") from exc


def build_model(name: str, config_dict: dict[str, Any]) -> nn.Module:
    """Rebuild a model from a checkpoint's saved config (all fields given, none defaulted)."""
    spec = get_spec(name)
    known = config_fields(spec)
    values = {k: v for k, v in config_dict.items() if k in known}
    try:
        return spec.model_cls(spec.config_cls(**values))
    except ValueError as exc:  # a model's own check of its config (as in create_model)
        raise DubokoError(f"cannot build model {name!r}: {exc}") from exc


def example_input(name: str, batch_size: int = 2, model: nn.Module | None = None) -> tuple:
    """An example input batch for a registered model (for summary and gradcheck)."""
    spec = get_spec(name)
    if spec.example_input is None:
        raise DubokoError(f"model {name!r} has no default input; give an input shape")
    config = model.config if model is not None else make_config(name)
    return spec.example_input(config, batch_size)


# ---------------------------------------------------------------------------------------------
# Tasks.

def register_task(cls: type) -> type:
    """Class decorator: register a `duboko.tasks.Task` subclass under its `name`."""
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"task class {cls.__name__} sets no `name`")
    known = _TASKS.entries.get(name)
    if known is not None and known is not cls:
        raise ValueError(f"task {name!r} is already registered by {known.__module__}")
    _TASKS.entries[name] = cls
    return cls


def task_names() -> list[str]:
    return _TASKS.names()


def get_task(name: str) -> type:
    """The registered task class called `name`; unknown names fail with the known ones."""
    return _TASKS.get(name)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


