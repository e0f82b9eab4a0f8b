"""Fine-tuning with `train.init_from` (`duboko train RECIPE --init-from RUN`): a run starts from
another run folder's weights, model and tokenizer. The case of issue #17: a small random GPT-2
built with `transformers`, saved in the Hugging Face layout, imported, then fine-tuned on a text
file; its validation loss on that text drops. Also: a GPT and an image classifier started from
runs of their own, the first step on exactly the source's weights, the refusals (one line, exit
2), and `--resume` of a fine-tuned run (its own state, the source no longer needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the GPT-2 import needs transformers (the [dev] extra)")

from duboko import config as C
from duboko.cli.main import main
from duboko.data.text import load_tokenizer
from duboko.errors import DubokoError
from duboko.export.hf_gpt2 import import_hf_gpt2
from duboko.io import load_tensors, sha256_file
from duboko.train.engine import Trainer
from duboko.train.run import load_run, write_manifest
from tests.conftest import TINY_CNN

TEXT = ("The meaning of life is a question that people have asked for a very long time. "
        "Some say the answer is forty two, others say it is love, or work, or nothing at all.\n") * 20
# The text to fine-tune on: the same words in other sentences, so the random GPT-2's BPE covers it.
NEW_TEXT = "".join(
    f"Some people say that the answer to life is {w}, and others say it is {v}; a question asked for a long time.\n"
    for w, v in [("love", "work"), ("work", "nothing"), ("forty two", "love"), ("nothing", "a question")] * 15
)
# A fine-tune small enough for seconds on one thread: 32-token windows, batches of 8.
TINY_FT = ["data.seq_len=32", "train.batch_size=8", "train.warmup_steps=0", "data.sample_tokens=0",
           "train.num_threads=1", "train.report=false"]


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A random GPT2LMHeadModel (2 layers, 32 wide) and its byte-level BPE, as save_pretrained writes them."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("hf-gpt2")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=2, show_progress=False)
    bpe.save_model(str(folder))  # vocab.json + merges.txt
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def gpt2_run(hf_folder, tmp_path_factory) -> Path:
    return import_hf_gpt2(hf_folder, tmp_path_factory.mktemp("runs") / "gpt2")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "my.txt"
    path.write_text(NEW_TEXT, encoding="utf-8")
    return path


def _fine_tune_sets(text_file: Path, *extra: str) -> list[str]:
    return _sets([f"data.path={text_file}", *TINY_FT, *extra])


def test_fine_tuning_an_imported_gpt2_lowers_its_validation_loss(gpt2_run, text_file, tmp_path, capsys):
    # The imported model on the same validation split of the new text (same config, no step yet).
    cfg = C.resolve("shakespeare-gpt", [("train.init_from", str(gpt2_run)), f"data.path={text_file}", *TINY_FT])
    before_trainer = Trainer(cfg, None, quiet=True)
    before = before_trainer.evaluate("val")["loss"]
    before_trainer.close()

    out = tmp_path / "tuned"
    sets = _fine_tune_sets(text_file, "train.max_steps=25", "train.report=true")
    assert main(["train", "shakespeare-gpt", "--init-from", str(gpt2_run), *sets, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"Starting from the weights of {gpt2_run}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    after = metrics["val_loss"]
    print(f"imported GPT-2 on the new text: val_loss {before:.4f} before, {after:.4f} after 25 steps")
    assert after < before - 0.1

    # The weights moved from the source's; the model and the tokenizer are the source's.
    source, tuned = load_tensors(gpt2_run / "model.safetensors"), load_tensors(out / "model.safetensors")
    assert source.keys() == tuned.keys()
    assert all(source[k].shape == tuned[k].shape for k in source)
    assert any(not torch.equal(source[k], tuned[k]) for k in source)
    theirs, ours = load_tokenizer(gpt2_run / "tokenizer.json"), load_tokenizer(out / "tokenizer.json")
    assert ours.to_dict() == theirs.to_dict()
    assert ours.encode(NEW_TEXT[:300]) == theirs.encode(NEW_TEXT[:300])
    assert load_run(out, device="cpu").task.tokenizer.to_dict() == theirs.to_dict()

    # config.json records where it started (and which version of it); the card says so too.
    saved = json.loads((out / "config.json").read_text())
    source_cfg = json.loads((gpt2_run / "config.json").read_text())
    assert saved["model"] == source_cfg["model"]
    assert saved["data"]["tokenizer"] == "bpe" and saved["data"]["vocab_size"] == source_cfg["data"]["vocab_size"]
    assert saved["train"]["init_from"] == str(gpt2_run)
    assert saved["train"]["init_from_sha256"] == sha256_file(gpt2_run / "manifest.json")
    assert saved["description"].startswith(f"Fine-tuned from {gpt2_run}")
    card = (out / "MODEL_CARD.md").read_text()
    assert f"Fine-tuned from {gpt2_run}" in card and "init_from_sha256" in card

    # The fine-tuned run generates on its own.
    assert main(["generate", str(out), "--prompt", "The answer", "--max-new-tokens", "5"]) == 0


def test_a_gpt_starts_from_another_gpt_runs_weights_at_its_first_step(text_file, tmp_path):
    source = tmp_path / "source"
    small = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=32", "train.max_steps=2"]
    assert main(["train", "shakespeare-gpt", *_sets(small), *_fine_tune_sets(text_file, "data.seq_len=16"),
                 "--out", str(source), "--quiet"]) == 0

    # The recipe's own [model] (4 layers × 128) gives way to the source's, without any --set.
    cfg = C.resolve("shakespeare-gpt", [("train.init_from", str(source)), f"data.path={text_file}", *TINY_FT,
                                        "data.seq_len=16"])
    assert cfg.model == json.loads((source / "config.json").read_text())["model"]

    trainer = Trainer(cfg, None, quiet=True)
    seen: dict[str, torch.Tensor] = {}
    step = trainer.task.training_step

    def first_step(model, batch):  # the weights the first loss is computed with
        if not seen:
            seen.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return step(model, batch)

    trainer.task.training_step = first_step
    trainer.step(next(iter(trainer.train_batches())))
    trainer.close()
    weights = load_tensors(source / "model.safetensors")
    assert seen.keys() == weights.keys()
    assert all(torch.equal(seen[k], weights[k]) for k in weights)
    now = trainer.model.state_dict()
    assert any(not torch.equal(now[k], weights[k]) for k in weights)  # and the step moved them


def test_an_image_classifier_starts_from_a_classifier_run(tmp_path):
    source = tmp_path / "cnn"
    quick = ["train.max_steps=2", "train.report=false", "train.num_threads=1"]
    assert main(["train", "mnist-cnn", *_sets(TINY_CNN + quick), "--out", str(source), "--quiet"]) == 0
    # Not one image_size override: the 16-pixel source sets model.image_size and data.image_size.
    cfg = C.resolve("mnist-cnn", [("train.init_from", str(source)), "data.limit_train=256", "data.limit_test=100",
                                  *quick])
    assert cfg.model["image_size"] == cfg.data.image_size == 16
    trainer = Trainer(cfg, None, quiet=True)
    weights = load_tensors(source / "model.safetensors")
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    trainer.close()
    with pytest.raises(DubokoError, match=r"model\.image_size=28 conflicts with train\.init_from .* model\.image_size=16"):
        C.resolve("mnist-cnn", [("train.init_from", str(source)), "image_size=28"])


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("duboko: error:"), err
    return err[0]


def test_bad_sources_and_overrides_are_one_line_with_exit_2(gpt2_run, text_file, tmp_path, capsys):
    out = tmp_path / "never"
    train = ["train", "shakespeare-gpt", "--out", str(out), *_fine_tune_sets(text_file, "train.max_steps=1")]

    line = _one_line_error(capsys, train + ["--init-from", str(tmp_path / "nope")])
    assert "train.init_from" in line and "does not exist" in line

    # A tampered source is refused before its config.json is parsed (here: no longer JSON at all).
    tampered = tmp_path / "tampered"
    shutil.copytree(gpt2_run, tampered)
    (tampered / "config.json").write_text("{not json", encoding="utf-8")
    line = _one_line_error(capsys, train + ["--init-from", str(tampered)])
    assert "config.json does not match its SHA-256" in line

    line = _one_line_error(capsys, train + ["--init-from", str(gpt2_run), "--set", "model.n_layer=3"])
    assert "model.n_layer=3 conflicts with train.init_from" in line and "model.n_layer=2" in line
    line = _one_line_error(capsys, train + ["--init-from", str(gpt2_run), "--set", "data.tokenizer=char"])
    assert "data.tokenizer='char' conflicts" in line and "data.tokenizer='bpe'" in line

    line = _one_line_error(capsys, ["train", "mnist-cnn", "--init-from", str(gpt2_run), "--out", str(out)])
    assert "is a 'language-model' run" in line and "'image-classification'" in line

    line = _one_line_error(capsys, ["train", "--resume", str(gpt2_run), "--init-from", str(gpt2_run)])
    assert "--init-from starts a new run" in line
    assert not out.exists()  # nothing was written for any of them


def test_the_engine_verifies_the_source_and_checks_every_shape(gpt2_run, text_file, tmp_path):
    """Through the library (no CLI pre-check): the Trainer verifies the manifest before it reads
    the weights, and names the tensor whose shape differs."""
    source = tmp_path / "source"
    shutil.copytree(gpt2_run, source)
    cfg = C.resolve("shakespeare-gpt", [("train.init_from", str(source)), f"data.path={text_file}", *TINY_FT])

    weights = source / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(DubokoError, match="model.safetensors does not match its SHA-256"):
        Trainer(cfg, tmp_path / "a", quiet=True)
    assert not (tmp_path / "a").exists()

    # A consistent folder (manifest rewritten) whose tensors do not fit its own config.
    state = load_tensors(gpt2_run / "model.safetensors")
    state["decoder.norm.weight"] = torch.ones(48)
    from duboko.io import save_tensors

    save_tensors(state, weights)
    write_manifest(source, ["tokenizer.json"])
    cfg = C.resolve("shakespeare-gpt", [("train.init_from", str(source)), f"data.path={text_file}", *TINY_FT])
    with pytest.raises(DubokoError, match=r"tensor 'decoder\.norm\.weight' .* has shape \(48,\), the model expects \(32,\)"):
        Trainer(cfg, None, quiet=True)

    # A config that recorded another version of the source (train.init_from_sha256) is refused.
    cfg.train.init_from_sha256 = "0" * 64
    with pytest.raises(DubokoError, match="the source run changed since"):
        Trainer(cfg, None, quiet=True)
    recipe = tmp_path / "pinned.toml"
    recipe.write_text(f'task = "language-model"\n[model]\nname = "gpt-char"\n[data]\npath = "{text_file}"\n'
                      f'[train]\ninit_from = "{source}"\ninit_from_sha256 = "{"0" * 64}"\n', encoding="utf-8")
    with pytest.raises(DubokoError, match="train.init_from_sha256 pins"):
        C.resolve(str(recipe))


def test_resume_of_a_fine_tuned_run_uses_its_own_state(gpt2_run, text_file, tmp_path):
    """3 steps, then `--resume` to 6 with the source deleted in between, equals 6 steps straight."""
    sets = _fine_tune_sets(text_file, "train.schedule=constant")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", "shakespeare-gpt", "--init-from", str(gpt2_run), *sets, "--set", "max_steps=6",
                 "--out", str(straight), "--quiet"]) == 0
    copy = tmp_path / "gpt2-copy"
    shutil.copytree(gpt2_run, copy)
    assert main(["train", "shakespeare-gpt", "--init-from", str(copy), *sets, "--set", "max_steps=3",
                 "--out", str(stopped), "--quiet"]) == 0
    shutil.rmtree(copy)  # a resume reads the run's own state, never the source again
    assert main(["train", "--resume", str(stopped), "--set", "max_steps=6", "--quiet"]) == 0
    assert json.loads((stopped / "metrics.json").read_text())["steps"] == 6
    a, b = load_tensors(straight / "model.safetensors"), load_tensors(stopped / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((stopped / "config.json").read_text())["train"]["init_from"] == str(copy)
    load_run(stopped, device="cpu")  # inference on it does not need the source either


def test_api_train_init_from_and_print_config(gpt2_run, text_file, tmp_path, capsys):
    import duboko

    source = duboko.load(gpt2_run)
    run = duboko.train("shakespeare-gpt", out=tmp_path / "api", init_from=source,
                       overrides=[f"data.path={text_file}", *TINY_FT], max_steps=2)
    assert run.config.train.init_from == str(gpt2_run) and run.config.model["name"] == "gpt2-small"
    with pytest.raises(DubokoError, match="init_from starts a new run"):
        duboko.train(tmp_path / "api", resume=True, init_from=gpt2_run)
    line = _one_line_error(capsys, ["train", "shakespeare-gpt", "--init-from", str(gpt2_run), "--print-config"])
    assert "data.seq_len=128 is longer than the model's context model.block_size=64; lower data.seq_len to 64" in line
    assert main(["train", "shakespeare-gpt", "--init-from", str(gpt2_run), "--set", "seq_len=32", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["n_embd"] == 32 and printed["train"]["init_from"] == str(gpt2_run)
