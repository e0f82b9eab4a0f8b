"""The Task contract of the five bundled tasks: `check` refuses a bad config before anything is
created (naming the key and the value), derived model fields are declared and written only
through `set_model_field`, `final_metrics` returns an `Evaluation`, `save_assets` names its files,
and the step statistics use the engine's keys."""

from __future__ import annotations

import pytest
import torch

from duboko import config as C
from duboko import registry
from duboko.errors import DubokoError
from duboko.tasks import Evaluation

TASKS = ("image-classification", "tabular", "language-model", "seq2seq", "diffusion")
SMALL_IMAGES = ["data.image_size=16", "model.image_size=16", "data.limit_train=64", "data.limit_test=40"]
TINY_UNET = ["model.base_channels=8", "model.channel_mults=[1, 2]", "model.groups=4", "model.num_heads=2",
             "model.attention_resolutions=[7]", "model.cross_attention_resolutions=[7]", "model.text_dim=16",
             "model.text_layers=1", "model.text_heads=2", "data.limit_train=64", "data.val_size=8",
             "data.eval_samples=0", "data.grid_rows=1", "data.grid_steps=2", "train.batch_size=16"]


def refused(recipe: str, sets: list[str], match: str) -> None:
    """`recipe` with `sets` is refused by its task's `check`, with a message matching `match`
    (`config.resolve` runs the check itself; calling it again keeps this test independent of
    that)."""
    with pytest.raises(DubokoError, match=match):
        cfg = C.resolve(recipe, sets)
        registry.get_task(cfg.task).check(cfg)


@pytest.mark.parametrize("name", TASKS)
def test_tasks_register_under_their_names(name):
    cls = registry.get_task(name)
    assert cls.name == name and name in registry.task_names()
    assert cls.losses and all(loss in ("cross_entropy", "bce", "mse") for loss in cls.losses)


@pytest.mark.parametrize("recipe", C.recipe_names())
def test_every_bundled_recipe_passes_its_check(recipe):
    cfg = C.resolve(recipe)
    cls = registry.get_task(cfg.task)
    cls.check(cfg)
    assert cls.allowed_losses(cfg)


BAD = [
    # train.loss and train.label_smoothing against the task's losses
    ("mnist-cnn", ["loss=mse"], r"train\.loss 'mse' does not fit task 'image-classification'"),
    ("mnist-cnn", ["loss=bce"], r"train\.loss 'bce'"),
    ("text-lstm", ["loss=mse"], r"train\.loss 'mse' does not fit task 'language-model'"),
    ("numbers-seq2seq", ["loss=bce"], r"train\.loss 'bce' does not fit task 'seq2seq'"),
    ("mnist-diffusion", ["loss=cross_entropy"], r"train\.loss 'cross_entropy' does not fit task 'diffusion'"),
    ("mnist-diffusion", ["label_smoothing=0.1"], r"train\.label_smoothing 0\.1 needs a cross-entropy loss"),
    ("diabetes-regression", ["label_smoothing=0.1"], r"train\.label_smoothing 0\.1 .*mse"),
    ("breast-cancer", ["label_smoothing=0.1"], r"train\.label_smoothing 0\.1 .*bce"),
    ("digits", ["loss=bce"], r"train\.loss 'bce'.*expected auto or cross_entropy"),
    ("digits", ["loss=mse"], r"train\.loss 'mse'"),
    ("breast-cancer", ["loss=mse"], r"train\.loss 'mse'.*bce \| cross_entropy"),
    ("diabetes-regression", ["loss=cross_entropy"], r"train\.loss 'cross_entropy'.*mse"),
    ("digits-binary", ["data.problem=regression", "loss=bce"], r"train\.loss 'bce'"),
    # image classification: [data] ranges and the model's shapes
    ("mnist-cnn", ["data.dataset=cifar"], r"data\.dataset"),
    ("mnist-cnn", ["data.image_size=2", "model.image_size=2"], r"data\.image_size must be >= 4, got 2"),
    ("mnist-cnn", ["data.channels=2"], r"data\.channels must be 1 or 3, got 2"),
    ("mnist-cnn", ["data.rotation=-5"], r"data\.rotation must be a finite number >= 0, got -5"),
    ("mnist-cnn", ["data.brightness=1.5"], r"data\.brightness must be < 1.*1\.5"),
    ("mnist-cnn", ["data.std=0"], r"data\.std must be > 0, got 0"),
    ("mnist-cnn", ["data.mean=nan"], r"data\.mean must be a finite number"),
    ("mnist-cnn", ["data.val_fraction=1.0"], r"data\.val_fraction must be in \[0, 1\), got 1\.0"),
    ("mnist-cnn", ["data.limit_train=-1"], r"data\.limit_train must be >= 0.*-1"),
    ("mnist-cnn", ["data.eval_batch_size=0"], r"data\.eval_batch_size must be >= 1, got 0"),
    ("mnist-cnn", ["model.num_classes=5"], r"model\.num_classes is 5 but data\.dataset 'mnist' has 10 classes"),
    ("mnist-cnn", ["data.image_size=32"], r"model\.image_size 48 differs from data\.image_size 32"),
    ("mnist-cnn", ["model.in_channels=1"], r"model\.in_channels 1 differs from data\.channels 3"),
    ("mnist-mlp", ["data.image_size=32"], r"model\.in_features 784 does not fit .* = 1024"),
    # tabular
    ("digits", ["data.dataset=iris"], r"data\.dataset"),
    ("digits", ["data.problem=ordinal"], r"data\.problem"),
    ("digits", ["data.test_fraction=0"], r"data\.val_fraction and data\.test_fraction .* got 0\.15 and 0\.0"),
    ("digits", ["data.val_fraction=0.5", "data.test_fraction=0.5"], r"data\.val_fraction and data\.test_fraction"),
    ("digits", ["data.path=x.csv"], r"data\.path is only for data\.dataset=csv, got data\.dataset 'digits'"),
    ("digits", ["data.dataset=csv"], r"data\.dataset=csv needs data\.path"),
    # language model
    ("text-lstm", ["data.tokenizer=sentencepiece"], r"data\.tokenizer"),
    ("text-lstm", ["data.seq_len=0"], r"data\.seq_len must be >= 1, got 0"),
    ("text-lstm", ["data.state_reset_prob=1.5"], r"data\.state_reset_prob must be in \[0, 1\], got 1\.5"),
    ("text-lstm", ["data.val_fraction=0"], r"data\.val_fraction must be between 0 and 1, got 0"),
    ("text-lstm", ["data.split_blocks=1"], r"data\.split_blocks must be >= 2, got 1"),
    ("shakespeare-gpt", ["data.seq_len=100000"], r"data\.seq_len=100000 is longer than .* model\.block_size="),
    # seq2seq
    ("numbers-seq2seq", ["data.direction=sideways"], r"data\.direction"),
    ("numbers-seq2seq", ["data.max_number=10"], r"data\.max_number must be >= 1000, got 10"),
    ("numbers-seq2seq", ["data.train_size=0"], r"data\.train_size must be >= 1, got 0"),
    ("numbers-seq2seq", ["data.max_number=2000", "data.val_size=500", "data.test_size=500"], r"data\.val_size \+ data\.test_size \(1000\)"),
    ("numbers-seq2seq", ["data.eval_beam=0"], r"data\.eval_beam must be >= 1.*got 0"),
    ("numbers-seq2seq", ["data.source=pairs.tsv", "data.val_fraction=0"], r"data\.val_fraction and data\.test_fraction"),
    # diffusion
    ("mnist-diffusion", ["data.dataset=cifar"], r"data\.dataset"),
    ("mnist-diffusion", ["data.sampler=euler"], r"data\.sampler"),
    ("mnist-diffusion", ["data.p_uncond=1.0"], r"data\.p_uncond must be in \[0, 1\), got 1\.0"),
    ("mnist-diffusion", ["data.beta_schedule=quadratic"], r"data\.beta_schedule"),
    ("mnist-diffusion", ["data.prediction_type=x0"], r"data\.prediction_type"),
    ("mnist-diffusion", ["data.num_train_timesteps=0"], r"data\.num_train_timesteps must be >= 1, got 0"),
    ("mnist-diffusion", ["data.sample_steps=0"], r"data\.sample_steps must be >= 1, got 0"),
    ("mnist-diffusion", ["data.guidance=-1"], r"data\.guidance must be a finite number >= 0, got -1"),
    ("mnist-text2img", ["model.max_prompt_len=10"], r"model\.max_prompt_len 10 is shorter than the longest caption"),
]


@pytest.mark.parametrize("recipe, sets, match", BAD, ids=[f"{r} {' '.join(s)}" for r, s, _ in BAD])
def test_check_refuses_a_bad_value_naming_the_key(recipe, sets, match):
    refused(recipe, sets, match)


def test_good_neighbours_of_the_refused_values_pass():
    for recipe, sets in [
        ("digits-binary", ["loss=cross_entropy"]),  # a binary target trains with two logits too
        ("breast-cancer", ["data.problem=classification", "loss=bce"]),  # two classes: bce fits
        ("mnist-cnn-fast", []),  # label smoothing with cross-entropy
        ("text-lstm", ["label_smoothing=0.1", "loss=cross_entropy"]),
        ("numbers-seq2seq", ["label_smoothing=0.1"]),
        ("mnist-mlp", ["data.image_size=32", "model.in_features=1024"]),
        ("numbers-seq2seq", ["data.source=pairs.tsv"]),  # the file itself is read in setup
    ]:
        cfg = C.resolve(recipe, sets)
        registry.get_task(cfg.task).check(cfg)


@pytest.mark.parametrize("recipe, key, source", [
    ("numbers-seq2seq", "vocab_size", "the piece tokenizer"),
    ("numbers-seq2seq", "eos_id", "the piece tokenizer"),
    ("digits", "in_features", "the feature columns of data.dataset"),
    ("breast-cancer", "out_features", "the classes of data.dataset"),
    ("mnist-text2img", "vocab_size", "the prompt tokenizer"),
    ("text-lstm", "vocab_size", "data.vocab_size"),
])
def test_overriding_a_derived_model_field_points_to_what_sets_it(recipe, key, source):
    with pytest.raises(DubokoError, match=rf"model\.{key} is derived by task .* from {source}"):
        C.resolve(recipe, [f"model.{key}=7"])


class RecordingDict(dict):
    """A model section that records every key written into it, however it is written."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()

    def __setitem__(self, key, value):
        self.written.add(key)
        super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, value=None):
        if key not in self:
            self[key] = value
        return self[key]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from duboko.data.text import default_corpus_path

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(default_corpus_path().read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def _setup(recipe, sets, tmp_path=None):
    cfg = C.resolve(recipe, sets)
    cls = registry.get_task(cfg.task)
    cls.check(cfg)
    cfg.model = RecordingDict(cfg.model)
    task = cls(cfg, torch.device("cpu"))
    task.setup()
    return cfg, task


@pytest.mark.parametrize(
    "recipe, sets, derived",
    [
        ("mnist-cnn", SMALL_IMAGES, set()),
        ("digits", [], {"in_features", "out_features"}),
        ("numbers-seq2seq", ["data.train_size=64", "data.val_size=8", "data.test_size=8"],
         {"vocab_size", "pad_id", "bos_id", "eos_id"}),
        ("mnist-text2img", TINY_UNET, {"vocab_size"}),
        ("mnist-diffusion-class", TINY_UNET[:5] + TINY_UNET[8:], set()),
        ("text-lstm", ["data.seq_len=16", "train.batch_size=8"], {"vocab_size"}),
    ],
)
def test_setup_writes_only_declared_model_fields(recipe, sets, derived, corpus):
    if recipe == "text-lstm":
        sets = [*sets, f"data.path={corpus}"]
    cfg, task = _setup(recipe, sets)
    assert cfg.model.written == derived
    assert derived <= set(type(task).derived_model_fields)
    for field, source in type(task).derived_model_fields.items():
        assert isinstance(source, str) and source, field  # what the refusal of --set points to
    with pytest.raises(RuntimeError, match="derived_model_fields"):
        task.set_model_field("dropout", 0.3)


def test_image_classification_contract(tmp_path):
    cfg, task = _setup("mnist-cnn", [*SMALL_IMAGES, "label_smoothing=0.1"])
    torch.manual_seed(0)
    model = task.build_model()
    x, y = next(task.train_batches(0))
    out = task.training_step(model, (x, y))
    assert set(out.stats) == {"loss_sum", "count", "accuracy"} and 0 <= int(out.stats["accuracy"]) <= len(y)
    assert task.save_assets(tmp_path) == []
    result = task.final_metrics(model, None, [])
    assert isinstance(result, Evaluation) and "report_text" not in result.metrics
    assert "test accuracy" in result.report and 0.0 <= result.metrics["test_accuracy"] <= 1.0
    assert not list(tmp_path.iterdir())  # run_dir None: nothing written anywhere


def test_tabular_contract(tmp_path):
    cfg, task = _setup("digits", [])
    model = task.build_model()
    assert task.save_assets(tmp_path) == ["tabular.json"] and (tmp_path / "tabular.json").is_file()
    result = task.final_metrics(model, None, [])
    assert isinstance(result, Evaluation) and "report_text" not in result.metrics
    assert result.metrics["loss_function"] == "cross_entropy" and "Classification report" in result.report


def test_seq2seq_contract(tmp_path):
    cfg, task = _setup("numbers-seq2seq", [
        "data.train_size=64", "data.val_size=8", "data.test_size=8", "data.max_number=9999",
        "model.d_model=16", "model.dim_feedforward=32", "model.num_heads=2", "model.num_encoder_layers=1",
        "model.num_decoder_layers=1", "model.max_len=24", "train.batch_size=16",
    ])
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(task.train_batches(0))
    out = task.training_step(model, batch)
    real = batch[2] != task.tokenizer.pad_id
    assert set(out.stats) == {"loss_sum", "count", "accuracy"} and out.stats["count"] == real.sum()
    assert task.save_assets(tmp_path) == ["seq2seq_tokenizer.json"]
    result = task.final_metrics(model, None, [])
    assert isinstance(result, Evaluation) and "report_text" not in result.metrics
    assert "held-out test: exact match" in result.report and result.metrics["test_examples"] == 8
    assert {"accuracy", "token_accuracy", "exact_match"} <= set(type(task).percent_metrics)
    # Two ranks: each takes every other pair of each global batch, and no rank is left empty.
    halves = [registry.get_task("seq2seq")(cfg, torch.device("cpu"), rank, 2) for rank in (0, 1)]
    for half in halves:
        half.setup()
    assert halves[0].num_train_batches() == halves[1].num_train_batches() == task.num_train_batches()
    for full, a, b in zip(task.train_batches(1), halves[0].train_batches(1), halves[1].train_batches(1)):
        assert len(a[0]) + len(b[0]) == len(full[0]) and len(b[0]) > 0
