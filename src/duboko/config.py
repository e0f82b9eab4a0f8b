"""Recipes and `--set` overrides, resolved into typed dataclasses.

A recipe is a TOML file (``src/duboko/recipes/NAME.toml``) with a one-line ``description``, the
``task`` that trains it, and three sections: ``[model]`` (``name`` plus the model config's fields),
``[data]`` (the task's data config) and ``[train]`` (the engine's `TrainConfig`). Every field is
typed; ``--set key=value`` overrides any of them, either dotted (``train.epochs=1``) or by its bare
name when only one section has it (``epochs=1``). Unknown keys and wrong types are refused with
the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from duboko.errors import DubokoError, unknown_name

SECTIONS = ("model", "data", "train")


@dataclass
class TrainConfig:
    """What the engine needs to train any family. One line per field says what it does."""

    epochs: int = 1  # passes over the training data
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    batch_size: int = 64  # global batch size (split across ranks under torchrun)
    optimizer: str = "adam"  # sgd | adam | adamw | rmsprop
    optimizer_impl: str = "auto"  # auto (fused where torch has it, else foreach) | fused | foreach | loop
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # L2 (sgd/adam/rmsprop) or decoupled (adamw) weight decay
    momentum: float = 0.9  # sgd and rmsprop momentum
    nesterov: bool = False  # Nesterov momentum for sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam(W) betas
    schedule: str = "constant"  # constant | cosine (with warmup) | onecycle
    warmup_steps: int = 0  # linear warm-up steps for the cosine schedule
    min_lr_ratio: float = 0.0  # cosine schedule floor, as a fraction of lr
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    loss: str = "auto"  # auto (the task's natural loss) | cross_entropy | bce | mse
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    ema_decay: float = 0.0  # exponential moving average of weights (0: off), e.g. 0.999
    seed: int = 0  # seeds every RNG; the same seed gives the same run on CPU
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights) | fp16 (cuda only) | auto (bf16 where native)
    channels_last: bool = False  # channels-last memory format for conv nets
    compile: bool = False  # torch.compile the model (measure first: it slowed MY_NET on CPU)
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    retain_cpu_memory: bool = True  # CPU: glibc malloc keeps freed memory (no page faults per step)
    log_grad_norms: bool = False  # per-layer gradient norms in history.csv (always in TensorBoard)
    log_every: int = 50  # TensorBoard scalars every N steps
    checkpoint_every: int = 0  # also save training state every N steps (0: at epoch ends only)
    nonfinite: str = "stop"  # stop | skip: what to do on a NaN/inf loss
    eval_every: int = 1  # validation pass every N epochs
    report: bool = True  # write report.html and MODEL_CARD.md into the run folder at the end
    strategy: str = "ddp"  # ddp (replicate the model per rank) | fsdp (shard it: torch's fully_shard, FSDP2)
    fsdp_cpu_offload: bool = False  # fsdp on cuda: keep sharded parameters and optimizer state in CPU memory
    grad_accum_steps: int = 1  # micro-batches per optimizer step; train.batch_size stays the step's whole batch
    # Fine-tuning: a run folder (an earlier run, or `duboko import-weights --from hf-gpt2`) whose
    # weights, [model] section and task assets (tokenizer, ...) this run starts from; "" = random init.
    init_from: str = ""
    init_from_sha256: str = ""  # SHA-256 of that run folder's manifest.json (recorded by resolve; a pin when set by hand)
    checkpoint_layout: str = "auto"  # auto (sharded under fsdp above 256 MiB of weights + optimizer state) | full | sharded


@dataclass
class RunConfig:
    """A fully resolved recipe: this is what `config.json` in a run folder holds."""

    recipe: str
    description: str
    task: str
    model: dict[str, Any]  # {"name": ..., fields of that model's config}
    data: Any  # the task's data-config dataclass
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "description": self.description,
            "task": self.task,
            "model": dict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }


# ---------------------------------------------------------------------------------------------
# Typed coercion of values from TOML / --set / JSON.


def parse_value(text: str) -> Any:
    """`--set` value text to a Python value: JSON/TOML literals, else the bare string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # RecursionError: "[[[[…" nested past the stack
        pass
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def coerce(value: Any, typ: Any, key: str) -> Any:
    """Check (and gently convert) `value` against a dataclass field type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except DubokoError as exc:
                errors.append(str(exc))
        raise DubokoError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        raise DubokoError(f"{key} expects a list like [1, 2], got {value!r}")
    if origin is dict or typ is dict:
        if isinstance(value, dict):
            return value
        raise DubokoError(f"{key} expects a table, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise DubokoError(f"{key} expects true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DubokoError(f"{key} expects an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise DubokoError(f"{key} expects a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise DubokoError(f"{key} expects text, got {value!r}")
    return value


def build_dataclass(cls: type, values: dict[str, Any], section: str) -> Any:
    """Build a config dataclass from a dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise DubokoError(
                f"unknown key {section}.{key}; valid keys in [{section}]: {', '.join(sorted(known))}"
            )
    typed = {k: coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**typed)
    except (TypeError, ValueError) as exc:
        raise DubokoError(f"bad [{section}] config: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Recipes.


def recipe_names() -> list[str]:
    folder = resources.files("duboko") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe_file(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Raw recipe dict from a bundled recipe name or a path to a TOML file."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise DubokoError(f"recipe file {name_or_path!r} does not exist")
        text = path.read_text(encoding="utf-8")
        name = path.stem
    else:
        if name_or_path not in recipe_names():
            raise unknown_name("recipe", name_or_path, recipe_names())
        text = (resources.files("duboko") / "recipes" / f"{name_or_path}.toml").read_text("utf-8")
        name = name_or_path
    try:
        return name, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DubokoError(f"recipe {name_or_path!r} is not valid TOML: {exc}") from exc


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in items:
        if "=" not in item:
            raise DubokoError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise DubokoError(f"--set expects key=value, got {item!r}")
        pairs.append((key, parse_value(text)))
    return pairs


# Keys renamed since runs were first written: (section, old, new). Every source (a recipe, a run
# folder's config.json, a config dict) goes through `_upgrade`, so old run folders load anywhere.
RENAMED_KEYS = [("data", "tokenizer_vocab", "vocab_size")]

# Overrides that `--resume` accepts: they change how long the run goes and what it logs, not what
# one step computes, so the resumed run stays bit-exact. Everything else (model, data, batch size,
# seed, optimizer, schedule, precision, ...) is refused with this list.
RESUME_SAFE = (
    "train.epochs",
    "train.max_steps",
    "train.checkpoint_every",
    "train.log_every",
    "train.log_grad_norms",
    "train.device",
    "train.num_threads",
    # Where the weights live, not what a step computes (an elastic resume changes the world size
    # the same way): results stay equal to float tolerance, bit-exact only with the same setting.
    "train.strategy",
    "train.fsdp_cpu_offload",
    "train.checkpoint_layout",
    "data.data_dir",  # where the same data lives (a moved folder)
    "data.path",
)


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Apply `RENAMED_KEYS` to a raw config (a copy; the input is left alone)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, old, new in RENAMED_KEYS:
        values = raw.get(section)
        if isinstance(values, dict) and old in values:
            raw[section] = {(new if k == old else k): v for k, v in values.items()}
    return raw


def _section_keys(raw: dict[str, Any], task_cls: type) -> dict[str, set[str]]:
    from duboko import registry

    model_name = raw.get("model", {}).get("name")
    model_keys = {"name"}
    if model_name:
        model_keys |= set(registry.config_fields(registry.get_spec(model_name)))
    return {
        "model": model_keys,
        "data": {f.name for f in dataclasses.fields(task_cls.data_config)},
        "train": {f.name for f in dataclasses.fields(TrainConfig)},
    }


def _override_targets(key: str, keys: dict[str, set[str]], task_cls: type, data: dict[str, Any]) -> list[tuple[str, str]]:
    """The (section, field) pairs an override key names: dotted, or bare when one section has it
    (or several, for a field the task shares between them, like image_size)."""
    derived = task_cls.derived_fields(data)
    if "." in key:
        section, sub = key.split(".", 1)
        if section not in SECTIONS:
            raise DubokoError(f"unknown section in {key!r}; expected one of: {', '.join(SECTIONS)}")
    else:
        # A bare name means a field the user may set: data.vocab_size, not the derived model one.
        owners = [s for s in SECTIONS if key in keys[s] and not (s == "model" and key in derived)]
        if not owners and key in derived:
            owners = ["model"]
        if len(owners) > 1 and key in task_cls.shared_fields:
            return [(s, key) for s in owners]
        if not owners:
            valid = sorted(f"{s}.{k}" for s in SECTIONS for k in keys[s] if not (s == "model" and k in derived))
            raise DubokoError(f"unknown key {key!r}; valid keys: {', '.join(valid)}")
        if len(owners) > 1:
            raise DubokoError(
                f"key {key!r} is in several sections; write one of: " + ", ".join(f"{s}.{key}" for s in owners)
            )
        section, sub = owners[0], key
    if section == "model" and sub in derived:
        raise DubokoError(
            f"model.{sub} is derived by task {task_cls.name!r} from {derived[sub]}; set that instead"
        )
    if sub not in keys[section]:
        valid = sorted(k for k in keys[section] if not (section == "model" and k in derived))
        raise DubokoError(f"unknown key {key!r}; valid keys in [{section}]: {', '.join(valid)}")
    return [(section, sub)]


def apply_overrides(raw: dict[str, Any], overrides: list[tuple[str, Any]], task_cls: type) -> dict[str, Any]:
    """Apply `--set` pairs to a raw config dict (sections: model, data, train)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for s in SECTIONS:
        raw.setdefault(s, {})
    for key, value in overrides:
        keys = _section_keys(raw, task_cls)  # model.name may change the model's keys
        for section, sub in _override_targets(key, keys, task_cls, raw["data"]):
            if section == "model" and sub == "name" and value != raw["model"].get("name"):
                raw["model"] = {"name": value}  # another model: its own defaults, not the old fields
            else:
                raw[section][sub] = value
    return raw


def _load_source(source: str | Path | dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
    """(recipe name, raw config, is_recipe_file) from a recipe name or .toml path, a run folder
    (its config.json) or a config dict (a run folder's config.json, already read)."""
    if isinstance(source, dict):
        return str(source.get("recipe", "run")), dict(source), False
    path = Path(source)
    # A bundled recipe name given as text wins over a folder of that name in the working
    # directory; a `Path` is always a path.
    if path.is_dir() and (isinstance(source, Path) or str(source) not in recipe_names()):
        config_file = path / "config.json"
        if not config_file.is_file():
            raise DubokoError(f"{str(path)!r} is a folder but not a run folder: it has no config.json")
        from duboko.io import read_json

        raw = read_json(config_file)
        if not isinstance(raw, dict):
            raise DubokoError(f"{config_file} is not a duboko config (expected a JSON object)")
        return str(raw.get("recipe", path.name)), raw, False
    name, raw = load_recipe_file(str(source))
    return name, raw, True


def resolve(
    source: str | Path | dict[str, Any],
    overrides: list[str] | list[tuple[str, Any]] | None = None,
    *,
    data_dir: str | None = None,
    resume: bool = False,
) -> RunConfig:
    """The one way to a `RunConfig`: from a bundled recipe name, a .toml recipe, a run folder (a
    `Path`, or text that names no bundled recipe) or a config dict, with `--set` overrides (``"key=value"`` strings or (key, value) pairs) and an
    optional data folder; renamed keys upgraded, every field type-checked, then the task's own
    `check`. With `resume=True` only the `RESUME_SAFE` overrides are accepted."""
    from duboko import registry

    name, raw, is_recipe = _load_source(source)
    raw = _upgrade(raw)
    extra = set(raw) - {"description", "task", *SECTIONS, "recipe"}
    if extra:
        raise DubokoError(
            f"recipe {name!r} has unknown top-level keys {sorted(extra)}; expected: description, task, "
            + ", ".join(f"[{s}]" for s in SECTIONS)
        )
    task_name = raw.get("task")
    if not task_name:
        raise DubokoError(f"recipe {name!r} names no task")
    task_cls = registry.get_task(task_name)
    pairs = [p for p in (overrides or []) if not isinstance(p, str)]
    pairs = parse_overrides([p for p in (overrides or []) if isinstance(p, str)]) + pairs
    if data_dir is not None:
        pairs.insert(0, (_data_dir_key(task_cls), data_dir))
    if is_recipe:
        fields = task_cls.derived_fields(dict(raw.get("data", {})))
        derived = sorted(set(raw.get("model", {})) & set(fields))
        if derived:
            key = derived[0]
            raise DubokoError(
                f"recipe {name!r} sets model.{key}, which task {task_name!r} derives from {fields[key]}; set that instead"
            )
    cfg = _build(raw, name, pairs, task_cls, recorded_ok=not is_recipe)
    if resume and pairs:
        _check_resume_overrides(_build(raw, name, [], task_cls, recorded_ok=True), cfg)
    return cfg


def _data_dir_key(task_cls: type) -> str:
    fields = {f.name for f in dataclasses.fields(task_cls.data_config)}
    for key in ("data_dir", "path"):
        if key in fields:
            return f"data.{key}"
    raise DubokoError(f"task {task_cls.name!r} reads no data folder (its [data] has no data_dir or path)")


# ---------------------------------------------------------------------------------------------
# Fine-tuning: `train.init_from`.

MANIFEST_FILE = "manifest.json"  # duboko.train.run.MANIFEST (config sits below train: no import)
INIT_KEYS = ("train.init_from", "init_from", "train.init_from_sha256", "init_from_sha256")


def init_data_fields(task_cls: type) -> tuple[str, ...]:
    """The [data] fields a run started from another run takes from that run's config: those the
    task shares with the model (image_size) and those that fix its assets (the LM tokenizer's
    kind and size: `Task.init_from_data_fields`)."""
    return tuple(dict.fromkeys((*task_cls.shared_fields, *getattr(task_cls, "init_from_data_fields", ()))))


def same_task_family(source_task: Any, task: str) -> bool:
    """Whether a run of `task` can start from a run of `source_task`: the same task, or one
    task's class derived from the other's (adversarial training from a plain image classifier,
    and back: the same model, data and assets)."""
    from duboko import registry

    if source_task == task:
        return True
    if not isinstance(source_task, str):
        return False
    try:
        a, b = registry.get_task(source_task), registry.get_task(task)
    except DubokoError:  # a task this installation does not know
        return False
    return issubclass(a, b) or issubclass(b, a)


@dataclass
class InitSource:
    """What `train.init_from` contributes to a config: the source run's resolved sections."""

    path: str  # train.init_from as given
    sha256: str  # of its manifest.json
    model: dict[str, Any]  # its [model] section (name + fields)
    data: dict[str, Any]  # its values of `init_data_fields`
    description: str


def read_init_source(init_from: str, task_cls: type, name: str, pinned: str = "") -> InitSource:
    """The source run of `train.init_from`: a run folder with config.json and manifest.json, of
    the same task as the recipe (its weights fit no other family's model). Its manifest is
    verified in full by the engine (`train.run.verify_init_source`) before its weights are read;
    `duboko train --init-from` verifies it before this runs too."""
    from duboko.io import read_json, sha256_file

    path = Path(init_from)
    if not path.is_dir():
        raise DubokoError(f"train.init_from: run folder {init_from!r} does not exist")
    for needed in ("config.json", MANIFEST_FILE):
        if not (path / needed).is_file():
            raise DubokoError(f"train.init_from: {init_from!r} is not a complete duboko run folder (it has no {needed})")
    digest = sha256_file(path / MANIFEST_FILE)
    if pinned and pinned != digest:
        raise DubokoError(
            f"train.init_from_sha256 pins {pinned[:16]}…, but the manifest of {init_from!r} now hashes to "
            f"{digest[:16]}…: the source run changed since; clear train.init_from_sha256 to start from it as it is"
        )
    raw = read_json(path / "config.json")
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or not raw["model"].get("name"):
        raise DubokoError(f"train.init_from: {path / 'config.json'} is not a duboko config (no [model] with a name)")
    raw = _upgrade(raw)
    if not same_task_family(raw.get("task"), task_cls.name):
        raise DubokoError(
            f"train.init_from {init_from!r} is a {raw.get('task')!r} run, but recipe {name!r} trains task "
            f"{task_cls.name!r}: a run starts only from the weights of a run of its own task family"
        )
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    fields = {k: data[k] for k in init_data_fields(task_cls) if k in data}
    return InitSource(init_from, digest, dict(raw["model"]), fields, str(raw.get("description", "")))


def _with_init_source(raw: dict[str, Any], name: str, pairs: list[tuple[str, Any]], task_cls: type,
                      recorded_ok: bool) -> tuple[dict[str, Any], InitSource | None]:
    """`raw` with the [model] section (and `init_data_fields`) of the `train.init_from` run, before
    the overrides are applied; and that source (None: no init_from, or a run folder's config that
    recorded it already, so that resume, eval and inference never need the source again)."""
    # Only [train] has these two keys, so the overrides that set them are found by name (the
    # others wait until the source's [model] is in place: they may name its fields).
    given = {k.removeprefix("train."): v for k, v in pairs if k in INIT_KEYS}
    effective = {**raw.get("train", {}), **given}
    init_from = effective.get("init_from")
    if init_from is None or init_from == "":
        return raw, None
    if not isinstance(init_from, str):  # checked before any truthiness test: 0 or False is not "no source"
        raise DubokoError(f"train.init_from expects the path of a run folder, got {init_from!r}")
    recorded = effective.get("init_from_sha256") or ""
    if not isinstance(recorded, str):
        raise DubokoError(f"train.init_from_sha256 expects a hex digest, got {recorded!r}")
    changed = init_from != raw.get("train", {}).get("init_from")
    if changed and "init_from_sha256" not in given:
        recorded = ""  # the recorded hash was another source's
    if recorded_ok and recorded and not changed:
        return raw, None
    source = read_init_source(init_from, task_cls, name, pinned=recorded)
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    raw["model"] = dict(source.model)  # the source's architecture wins over the recipe's
    raw["data"] = {**raw.get("data", {}), **source.data}
    raw["train"] = {**raw.get("train", {}), "init_from": init_from, "init_from_sha256": source.sha256}
    # The recipe's own description names its architecture, which is not this run's.
    raw["description"] = (f"Fine-tuned from {init_from} ({source.description or 'no description'}) "
                          f"with the data and training settings of recipe {name!r}")
    return raw, source


def _check_init_conflicts(cfg: RunConfig, source: InitSource, task_cls: type) -> None:
    """An override that changes the source run's architecture (or its assets' data fields) is one
    error naming the key and both values: the source's weights would not fit."""
    from duboko import registry

    model = dict(source.model)
    spec = registry.get_spec(str(model.pop("name")))
    theirs = {"name": spec.name, **dataclasses.asdict(build_dataclass(spec.config_cls, {**spec.defaults, **model}, "model"))}
    hints = typing.get_type_hints(task_cls.data_config)
    wanted = [(f"model.{k}", v, cfg.model.get(k)) for k, v in theirs.items()]
    wanted += [(f"data.{k}", coerce(v, hints[k], f"data.{k}"), getattr(cfg.data, k)) for k, v in source.data.items()]
    for key, expected, got in wanted:
        if got != expected:
            raise DubokoError(
                f"{key}={got!r} conflicts with train.init_from {source.path!r}, whose run has {key}={expected!r}: "
                "a run started from another run's weights keeps its architecture and tokenizer (drop the override, "
                "or train from scratch without init_from)"
            )


def _build(raw: dict[str, Any], name: str, pairs: list[tuple[str, Any]], task_cls: type,
           recorded_ok: bool = True) -> RunConfig:
    from duboko import registry

    for section in ("model", "data", "train"):
        if not isinstance(raw.get(section, {}), dict):
            raise DubokoError(f"[{section}] must be a table of key = value, got {type(raw[section]).__name__}")
    raw, source = _with_init_source(raw, name, pairs, task_cls, recorded_ok)
    raw = apply_overrides(raw, pairs, task_cls)
    model_section = dict(raw["model"])
    model_name = model_section.pop("name", None)
    if not model_name:
        raise DubokoError(f"recipe {name!r} has no model.name; known models: {', '.join(registry.model_names())}")
    spec = registry.get_spec(model_name)
    model_cfg = build_dataclass(spec.config_cls, {**spec.defaults, **model_section}, "model")
    data_cfg = build_dataclass(task_cls.data_config, raw["data"], "data")
    train_cfg = build_dataclass(TrainConfig, raw["train"], "train")
    validate_train(train_cfg)
    cfg = RunConfig(
        recipe=str(raw.get("recipe", name)),
        description=str(raw.get("description", "")),
        task=raw["task"],
        model={"name": model_name, **dataclasses.asdict(model_cfg)},
        data=data_cfg,
        train=train_cfg,
    )
    if source is not None:
        _check_init_conflicts(cfg, source, task_cls)
    task_cls.check(cfg)
    return cfg


def _flatten(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    return {f"{s}.{k}": v for s in SECTIONS for k, v in d[s].items()}


def _check_resume_overrides(saved: RunConfig, wanted: RunConfig) -> None:
    before, after = _flatten(saved), _flatten(wanted)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    refused = [k for k in changed if k not in RESUME_SAFE]
    if refused:
        raise DubokoError(
            f"cannot resume with {', '.join(f'{k}={after.get(k)!r}' for k in refused)}: it changes what the "
            f"saved run computes, so the resume would not be exact (model, data, batch size, seed, optimizer, "
            f"...). Overrides a resume accepts: {', '.join(RESUME_SAFE)}. Train a new run in another folder instead"
        )


def require_at_least(section: str, values: Any, minimum: float, *keys: str, note: str = "") -> None:
    """Each `section.key` of `values` must be >= `minimum` (a float also finite); the message
    names the key, the bound and the value received. `note` explains the bound ("0: all")."""
    for key in keys:
        value = getattr(values, key)
        if isinstance(value, float):
            if not (math.isfinite(value) and value >= minimum):
                raise DubokoError(f"{section}.{key} must be a finite number >= {minimum:g}{note}, got {value!r}")
        elif value < minimum:
            raise DubokoError(f"{section}.{key} must be >= {minimum:g}{note}, got {value!r}")


CHOICES = {
    "optimizer": ("sgd", "adam", "adamw", "rmsprop"),
    "optimizer_impl": ("auto", "fused", "foreach", "loop"),
    "schedule": ("constant", "cosine", "onecycle"),
    "loss": ("auto", "cross_entropy", "bce", "mse"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "nonfinite": ("stop", "skip"),
    "strategy": ("ddp", "fsdp"),
    "checkpoint_layout": ("auto", "full", "sharded"),
}


def validate_train(cfg: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise unknown_name(f"train.{key}", value, allowed)
    positive = {"batch_size": cfg.batch_size, "lr": cfg.lr, "eval_every": cfg.eval_every}
    for key, value in positive.items():
        if value <= 0:
            raise DubokoError(f"train.{key} must be > 0, got {value!r}")
    if cfg.epochs < 1 and cfg.max_steps < 1:
        raise DubokoError(f"train.epochs must be >= 1 (or set max_steps), got {cfg.epochs!r}")
    if len(cfg.betas) != 2:
        raise DubokoError(f"train.betas expects two numbers, got {cfg.betas!r}")
    # Ranges (torch would otherwise fail deep inside with a traceback, or silently misbehave).
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise DubokoError(f"train.{f.name} must be a finite number, got {value!r}")
    if not all(isinstance(b, float) and 0.0 <= b < 1.0 for b in cfg.betas):
        raise DubokoError(f"train.betas must be two numbers in [0, 1), got {cfg.betas!r}")
    bounded = {"momentum": (0.0, 1.0), "ema_decay": (0.0, 0.999999), "label_smoothing": (0.0, 1.0), "min_lr_ratio": (0.0, 1.0)}
    for key, (lo, hi) in bounded.items():
        if not lo <= getattr(cfg, key) <= hi:
            raise DubokoError(f"train.{key} must be in [{lo:g}, {hi:g}], got {getattr(cfg, key)!r}")
    require_at_least("train", cfg, 0, "weight_decay", "grad_clip", "epochs", "max_steps", "warmup_steps", "num_threads",
                     "checkpoint_every")
    require_at_least("train", cfg, 1, "log_every", "grad_accum_steps")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise DubokoError(
            f"train.batch_size={cfg.batch_size} must be divisible by train.grad_accum_steps={cfg.grad_accum_steps} "
            "(batch_size is the whole batch of one optimizer step, cut into grad_accum_steps micro-batches)"
        )
