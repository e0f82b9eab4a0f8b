"""The Python API (`import duboko`): every public function on tiny runs, the CLI and the API giving
the same metrics, the docstring examples (doctest) and docs/api.md against the real signatures."""

from __future__ import annotations

import doctest
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import duboko
from duboko import api
from duboko.cli.main import main
from duboko.data.text import default_corpus_path, train_tokenizer
from duboko.errors import DubokoError

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"train_seconds", "wall_seconds"}
TINY_DIGITS = {"epochs": 2, "num_threads": 1}
TINY_MLP = ["data.limit_train=256", "data.limit_test=100", "train.epochs=1", "train.num_threads=1",
            "model.hidden_sizes=[16]", "data.eval_batch_size=100"]
TINY_T2I = {
    "model.base_channels": 8, "model.channel_mults": [1, 2], "model.groups": 4, "model.num_heads": 2,
    "model.attention_resolutions": [7], "model.text_dim": 16, "model.text_layers": 1, "model.text_heads": 2,
    "model.cross_attention_resolutions": [7], "data.limit_train": 64, "data.val_size": 16, "data.eval_samples": 0,
    "data.grid_rows": 1, "data.grid_steps": 2, "data.eval_batch_size": 16, "train.epochs": 1,
    "train.batch_size": 16, "train.warmup_steps": 0, "train.ema_decay": 0, "train.num_threads": 1,
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> duboko.Run:
    return duboko.train("digits", out=tmp_path_factory.mktemp("api") / "digits", **TINY_DIGITS)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> duboko.Run:
    return duboko.train("mnist-mlp", out=tmp_path_factory.mktemp("api") / "mlp", overrides=TINY_MLP)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> duboko.Run:
    folder = tmp_path_factory.mktemp("api")
    corpus = folder / "plays.txt"
    corpus.write_text(default_corpus_path().read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return duboko.train("text-lstm", out=folder / "lm", overrides={
        "data.path": str(corpus), "model.hidden_size": 32, "data.seq_len": 16, "train.batch_size": 16,
        "train.max_steps": 20, "train.epochs": 1, "data.sample_tokens": 10, "train.num_threads": 1,
        "train.warmup_steps": 0})


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory) -> duboko.Run:
    return duboko.train("mnist-text2img", out=tmp_path_factory.mktemp("api") / "t2i", overrides=TINY_T2I)


# ---------------------------------------------------------------------------------------------
# The package.


def test_import_duboko_is_light_and_exposes_the_api():
    code = ("import sys, duboko; heavy = [m for m in ('torch', 'duboko.api', 'duboko.train') if m in sys.modules];"
            "print(heavy); print(callable(duboko.train), callable(duboko.load))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True True"
    assert set(duboko.__all__) <= set(dir(duboko))
    with pytest.raises(AttributeError):
        duboko.no_such_name  # noqa: B018


def test_api_names_shared_with_subpackages_are_both():
    code = ("from duboko import train, models; import duboko.train.run, duboko.models.cnn;"
            "print(callable(train), callable(models), train.run.__name__, models.cnn.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "duboko.train.run", "duboko.models.cnn"]
    import duboko.train.engine  # noqa: F401  (binds the subpackage to duboko.train)

    assert callable(duboko.train) and duboko.train.engine.Trainer.__name__ == "Trainer"
    assert inspect.signature(duboko.train) == inspect.signature(api.train)
    assert duboko.train.__doc__ == api.train.__doc__
    import duboko.models.cnn  # noqa: F401

    assert duboko.models.cnn.__name__ == "duboko.models.cnn" and duboko.models()["my_net"].startswith("[cnn]")


# ---------------------------------------------------------------------------------------------
# What is there.


def test_recipes_and_models_list_what_the_cli_lists(capsys):
    assert main(["recipes"]) == 0
    cli = capsys.readouterr().out
    names = duboko.recipes()
    assert list(names) == sorted(names) and "mnist-cnn" in names
    for name, description in names.items():
        assert f"{name}" in cli and description in cli
    assert main(["models"]) == 0
    cli = capsys.readouterr().out
    found = duboko.models()
    assert found and all(f"{name}" in cli and text in cli for name, text in found.items())
    cnn = duboko.models("cnn")
    assert "my_net" in cnn and all(v.startswith("[cnn]") for v in cnn.values())
    with pytest.raises(DubokoError, match="no model of family 'nope'; known families: .*cnn"):
        duboko.models("nope")


def test_create_model_is_a_plain_module():
    net = duboko.create_model("my_net", num_classes=7)
    assert isinstance(net, torch.nn.Module) and net.training
    assert net(torch.randn(2, 3, 48, 48)).shape == (2, 7)
    with pytest.raises(DubokoError, match="unknown model 'nope'|nope"):
        duboko.create_model("nope")


def test_summary_of_a_name_and_of_a_module_is_the_cli_table(capsys):
    s = duboko.summary("my_net", input_shape=(3, 48, 48))
    assert main(["summary", "my_net", "--input-shape", "3,48,48"]) == 0
    assert capsys.readouterr().out.strip() == str(s).strip()
    net = duboko.create_model("my_net")
    t = duboko.summary(net, input_shape=(3, 48, 48))
    assert t.total_params == s.total_params == sum(p.numel() for p in net.parameters())
    assert t.mult_adds == s.mult_adds > 0
    assert "<pre>" in t._repr_html_() and "fc1" in t._repr_html_()
    assert t.to_dict()["total_params"] == t.total_params
    assert duboko.summary("my_net", forward=False).total_params == s.total_params
    with pytest.raises(DubokoError, match="needs input_shape"):
        duboko.summary(net)
    with pytest.raises(DubokoError, match="input_shape expects positive sizes"):
        duboko.summary(net, input_shape=(3, 0, 48))


# ---------------------------------------------------------------------------------------------
# Training.


def test_cli_and_api_give_the_same_metrics(tmp_path, capsys, digits_run):
    assert main(["train", "digits", "--set", "epochs=2", "--set", "train.num_threads=1", "--out",
                 str(tmp_path / "cli"), "--quiet"]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    api_file = json.loads((digits_run.run_dir / "metrics.json").read_text())
    assert set(cli) == set(api_file)
    assert {k: v for k, v in cli.items() if k not in TIMINGS} == {k: v for k, v in api_file.items() if k not in TIMINGS}
    assert digits_run.metrics == api_file  # what `train` returned is what it wrote
    assert 0.5 < cli["test_accuracy"] <= 1.0 and cli["epochs"] == 2


def test_train_prints_nothing_unless_verbose(tmp_path, capsys):
    duboko.train("digits", out=tmp_path / "quiet", epochs=1, num_threads=1)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    duboko.train("digits", out=tmp_path / "loud", epochs=1, num_threads=1, verbose=True, progress=False)
    out = capsys.readouterr().out
    assert "digits: mlp-tabular" in out and f"Run folder: {tmp_path / 'loud'}" in out
    duboko.train("digits", out=tmp_path / "bar", epochs=1, num_threads=1, progress=True)
    captured = capsys.readouterr()
    assert "Epoch 1/1" in captured.out + captured.err and "Run folder" not in captured.out  # a bar, no lines


def test_train_errors_are_the_config_errors(tmp_path):
    with pytest.raises(DubokoError) as api_error:
        duboko.train("digits", out=tmp_path / "x", overrides={"train.lr": -1.0})
    from duboko.config import resolve

    with pytest.raises(DubokoError) as resolve_error:
        resolve("digits", ["train.lr=-1"])
    assert str(api_error.value) == str(resolve_error.value) and "train.lr" in str(api_error.value)
    with pytest.raises(DubokoError, match="unknown key 'no_such_key'"):
        duboko.train("digits", out=tmp_path / "y", no_such_key=1)
    with pytest.raises(DubokoError, match="overrides expects a dict"):
        duboko.train("digits", out=tmp_path / "z", overrides="epochs=1")
    with pytest.raises(DubokoError, match="cannot resume"):
        duboko.train(tmp_path / "nothing", resume=True)
    assert not (tmp_path / "x").exists()


def test_train_resume_continues_a_run(tmp_path):
    first = duboko.train("digits", out=tmp_path / "r", epochs=1, num_threads=1)
    assert first.metrics["epochs"] == 1
    more = duboko.train(tmp_path / "r", resume=True, epochs=2)
    assert more.metrics["epochs"] == 2 and [row["epoch"] for row in more.history] == [1, 2]
    with pytest.raises(DubokoError, match="train.lr"):  # resume refuses a change that is not exact
        duboko.train(tmp_path / "r", resume=True, overrides={"train.lr": 0.5})


def test_default_run_dir_numbers_taken_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert duboko.default_run_dir("digits") == Path("runs/digits")
    (tmp_path / "runs" / "digits").mkdir(parents=True)
    (tmp_path / "runs" / "digits" / "config.json").write_text("{}")
    assert duboko.default_run_dir("digits") == Path("runs/digits-2")


# ---------------------------------------------------------------------------------------------
# Runs.


def test_load_gives_config_metrics_history_and_eval_json(digits_run, capsys):
    run = duboko.load(digits_run.run_dir, device="cpu")
    assert run.config.recipe == "digits" and run.config.train.epochs == 2
    assert run.metrics == digits_run.metrics
    assert [row["epoch"] for row in run.history] == [1, 2] and "val_loss" in run.history[0]
    assert main(["eval", str(run.run_dir), "--json", "--device", "cpu"]) == 0
    assert run.evaluate() == json.loads(capsys.readouterr().out)
    html = run._repr_html_()
    assert "test_accuracy" in html and "data:image/png;base64," in html  # curves.png inline
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(DubokoError, match="history_frame needs pandas"):
            run.history_frame()
    else:
        assert list(run.history_frame()["epoch"]) == [1, 2]


def test_load_refuses_missing_foreign_and_tampered_folders(tmp_path, digits_run):
    with pytest.raises(DubokoError, match="does not exist"):
        duboko.load(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DubokoError, match="is not a run folder"):
        duboko.load(tmp_path / "empty")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(digits_run.run_dir, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(DubokoError, match="does not match its SHA-256"):
        duboko.load(copy)


def test_predict_files_pil_and_numpy_like_the_cli(mlp_run, tmp_path, capsys):
    from PIL import Image

    from duboko.data.mnist import load_split

    images, labels = load_split("test", None, limit=3)
    array = images[0].numpy()  # (28, 28) uint8, light digit on dark
    path = tmp_path / "digit.png"
    Image.fromarray(array).save(path)
    unit = array.astype(np.float32) / 255.0  # floats in [0, 1], as an array and as a PIL "F" image
    got = mlp_run.predict([str(path), Image.fromarray(array), array, unit, Image.fromarray(unit)])
    assert main(["predict", str(mlp_run.run_dir), str(path), "--json", "--top", "10"]) == 0
    cli = json.loads(capsys.readouterr().out)["predictions"][0]
    for result in got:
        assert result["class"] == cli["class"]
        assert list(result["probabilities"]) == [c for c, _ in cli["top"]]  # most likely first
        assert result["probabilities"] == pytest.approx(dict(cli["top"]), abs=1e-6)  # the same preprocessing
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert got[0]["input"] == str(path) and got[2]["input"] == "<array 2>"
    inverted = mlp_run.predict(255 - array)[0]  # a dark digit on paper is inverted, as from a file
    assert inverted["inverted"] and inverted["class"] == cli["class"]
    assert len(mlp_run.predict(array, top=3)[0]["probabilities"]) == 3
    with pytest.raises(DubokoError, match="a numpy image must be"):
        mlp_run.predict(np.zeros((2, 3, 5, 5)))
    with pytest.raises(DubokoError, match="expected a file path, a PIL image or a numpy array"):
        mlp_run.predict([42])
    with pytest.raises(DubokoError, match="does not exist"):
        mlp_run.predict(str(tmp_path / "missing.png"))


def test_family_methods_refuse_other_runs(digits_run, mlp_run):
    with pytest.raises(DubokoError, match="is a tabular run; `predict` needs an image-classification run"):
        digits_run.predict(np.zeros((28, 28), np.uint8))
    with pytest.raises(DubokoError, match="'image-classification' run; generate needs a 'language-model' run"):
        mlp_run.generate("x")
    with pytest.raises(DubokoError, match="sample needs a 'diffusion' run"):
        mlp_run.sample()


def test_generate_matches_the_cli_and_stream_matches_generate(lm_run, capsys):
    text = lm_run.generate("ROMEO:", max_new_tokens=40, temperature=0.8, seed=3)
    assert main(["generate", str(lm_run.run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "3",
                 "--no-prompt"]) == 0
    assert capsys.readouterr().out == text + "\n"
    pieces = list(lm_run.stream("ROMEO:", max_new_tokens=40, temperature=0.8, seed=3))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert lm_run.generate("ROMEO:", max_new_tokens=40, seed=4) != text
    greedy = lm_run.generate("ROMEO:", max_new_tokens=10, temperature=0)
    assert greedy == lm_run.generate("ROMEO:", max_new_tokens=10, temperature=0, top_k=1)
    for i, _ in enumerate(lm_run.stream("ROMEO:", max_new_tokens=100_000)):  # leaving early stops it
        if i == 2:
            break
    with pytest.raises(DubokoError, match="max_new_tokens must be in 1.."):
        lm_run.generate("x", max_new_tokens=0)
    with pytest.raises(DubokoError, match="max_new_tokens must be in 1.."):
        lm_run.stream("x", max_new_tokens=0)  # checked at the call, not at the first piece
    with pytest.raises(DubokoError, match=r"top_p must be in \(0, 1\]"):
        lm_run.generate("x", top_p=1.5)


def test_incremental_decoder_decodes_a_short_window_per_token():
    text = "Ünïcødé text, naïve café: 東京 and emoji 🙂🙂 repeated. " * 4
    tok = train_tokenizer("bpe", text, vocab_size=300)
    ids = tok.encode(text)
    lengths: list[int] = []

    def decode(window: list[int]) -> str:
        lengths.append(len(window))
        return tok.decode(window)

    decoder = api.IncrementalDecoder(decode)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert max(lengths) <= 8 < len(ids)  # a window, never the whole text


def test_sample_diffusion_images(t2i_run):
    images = t2i_run.sample("a handwritten three", n=3, steps=3, seed=1)
    assert images.shape == (3, 1, 28, 28) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert torch.equal(images, t2i_run.sample("a handwritten three", n=3, steps=3, seed=1))
    assert not torch.equal(images, t2i_run.sample("a handwritten three", n=3, steps=3, seed=2))
    assert t2i_run.sample(None, n=2, steps=2).shape == (2, 1, 28, 28)
    with pytest.raises(DubokoError, match="n must be in 1.."):
        t2i_run.sample(n=0)
    with pytest.raises(DubokoError, match="label must be a digit 0-9"):
        t2i_run.sample(12, n=1)


# ---------------------------------------------------------------------------------------------
# Docstrings and the reference page.


def test_docstring_examples_run():
    result = doctest.testmod(api, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


def signature_text(obj, drop_self: bool = False) -> str:
    """inspect.signature as written in docs/api.md: annotations unquoted, defaults as repr."""
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())[1 if drop_self else 0:]
    parts, star = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    out = "(" + ", ".join(parts) + ")"
    return out + (f" -> {sig.return_annotation}" if sig.return_annotation is not sig.empty else "")


def test_every_public_name_is_documented_with_its_signature():
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = []
    for name in duboko.__all__:
        obj = getattr(api, name)
        if f"### duboko.{name}\n" not in page or f"duboko.{name}{signature_text(obj)}" not in page:
            missing.append(f"duboko.{name}{signature_text(obj)}")
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                wanted = f"`{obj.__name__}.{attr}`" if isinstance(member, property) else \
                    f"{obj.__name__}.{attr}{signature_text(member, drop_self=True)}"
                if wanted not in page and f"`{obj.__name__}.{attr}`, " not in page:
                    missing.append(wanted)
    assert not missing, "not in docs/api.md (or with another signature):\n" + "\n".join(missing)
