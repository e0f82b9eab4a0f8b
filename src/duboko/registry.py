"""Model registry and factory, in the manner of timm's `register_model` / `create_model`.

Every model family registers named variants here. A variant is a model class, its typed config
dataclass and the overrides that make the variant (``gpt-tiny`` is ``GPT(GPTConfig(n_layer=2, ...))``).
The config is saved with each checkpoint, so ``build_model(name, config_dict)`` rebuilds the model.
"""

from __future__ import annotations

import dataclasses
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


_MODELS: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    model_cls: type[nn.Module],
    config_cls: type,
    description: str = "",
    example_input: Callable[[Any, int], tuple] | None = None,
    **defaults: Any,
) -> ModelSpec:
    """Register a named model variant. Re-registering a name is a programming error."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    spec = ModelSpec(name, family, model_cls, config_cls, dict(defaults), description, example_input)
    _MODELS[name] = spec
    return spec


def _load_builtin_models() -> None:
    # Importing the families registers their variants; imported lazily so that `duboko --help`
    # stays fast and lower layers never import the registry's users.
    import duboko.models  # noqa: F401


def model_names() -> list[str]:
    _load_builtin_models()
    return sorted(_MODELS)


def get_spec(name: str) -> ModelSpec:
    _load_builtin_models()
    if not isinstance(name, str) or name not in _MODELS:
        raise unknown_name("model", name, _MODELS)
    return _MODELS[name]


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
    try:
        return spec.config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise DubokoError(f"bad config for model {name!r}: {exc}") from exc


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
        raise DubokoError(f"model {name!r} has no default input; pass --input-shape")
    config = model.config if model is not None else make_config(name)
    return spec.example_input(config, batch_size)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


