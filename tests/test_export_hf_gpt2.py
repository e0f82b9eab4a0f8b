"""GPT-2 from the Hugging Face layout: a small random GPT2LMHeadModel saved by transformers, imported
as a duboko run folder, gives the same logits (1e-4), greedy generations and tokenizer ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the GPT-2 parity test needs transformers (the [dev] extra)")

from duboko.errors import DubokoError
from duboko.export.hf_gpt2 import import_hf_gpt2
from duboko.train.run import load_run

TEXT = ("The meaning of life is a question that people have asked for a very long time. "
        "Some say the answer is forty two, others say it is love, or work, or nothing at all.\n") * 20
PROMPTS = ["The meaning of life is", "Some say", "work, or"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator([TEXT], vocab_size=300, min_frequency=2, show_progress=False)
    bpe.save_model(str(folder))  # vocab.json + merges.txt
    vocab = bpe.get_vocab_size()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def run(hf_folder, tmp_path_factory) -> Path:
    return import_hf_gpt2(hf_folder, tmp_path_factory.mktemp("runs") / "gpt2")


def test_logits_and_greedy_generations_match_transformers(hf_folder, run):
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    loaded = load_run(run, device="cpu")
    tok = loaded.task.tokenizer
    ids = torch.tensor([tok.encode(TEXT[:200])[:48]])
    with torch.no_grad():
        ours = loaded.model(ids)[0]
        theirs = hf(ids).logits
    err = (ours - theirs).abs().max().item()
    print(f"GPT-2 import: max abs logit difference to GPT2LMHeadModel = {err:.2e}")
    assert err < 1e-4
    for prompt in PROMPTS:
        x = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            want = hf.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, x.shape[1]:].tolist()
            got, seq = [], x
            for _ in range(12):  # greedy, uncached, with duboko's model
                nxt = loaded.model(seq)[0][:, -1].argmax(-1, keepdim=True)
                got.append(int(nxt))
                seq = torch.cat((seq, nxt), dim=1)
        assert got == want, prompt


def test_tokenizer_ids_match_gpt2_tokenizer_fast(hf_folder, run):
    fast = transformers.GPT2TokenizerFast.from_pretrained(hf_folder)  # reads vocab.json + merges.txt
    tok = load_run(run, device="cpu").task.tokenizer
    for text in ("The meaning of life is", "  spaces  and\nnew lines", "unicode: żółć ☃", "forty two, 42!"):
        assert fast.encode(text) and tok.encode(text) == fast.encode(text)
        assert tok.decode(tok.encode(text)) == text


def test_generate_command_runs_on_the_imported_folder(run):
    out = subprocess.run([sys.executable, "-m", "duboko", "generate", str(run), "--prompt", "The meaning",
                          "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The meaning")


def _copy(hf_folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(hf_folder, dst)
    return dst


def test_non_gpt2_config_is_one_line(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DubokoError, match="model_type 'llama'; expected 'gpt2'"):
        import_hf_gpt2(folder, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_and_mismatched_tensors_are_refused(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_folder, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("h.1.mlp.c_fc.weight"))
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, folder / "model.safetensors")
    with pytest.raises(DubokoError, match="no tensor 'h.1.mlp.c_fc.weight'"):
        import_hf_gpt2(folder, tmp_path / "run")
    wrong = dict(tensors)
    wrong[key] = torch.zeros(3, 3)
    save_file(wrong, folder / "model.safetensors")
    with pytest.raises(DubokoError, match=r"h.1.mlp.c_fc.weight has shape \(3, 3\), expected \(64, 256\)"):
        import_hf_gpt2(folder, tmp_path / "run")


def test_pickle_only_folder_points_at_scan(hf_folder, tmp_path):
    folder = _copy(hf_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    with pytest.raises(DubokoError, match="never loads pickles.*duboko scan"):
        import_hf_gpt2(folder, tmp_path / "run")


def test_cli_import_hf_error_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = subprocess.run([sys.executable, "-m", "duboko", "import-hf", str(tmp_path), "--from", "hf-gpt2",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "expected 'gpt2'" in out.stderr


def test_gpt_activation_option_keeps_default_models_and_uses_tanh_gelu():
    import torch.nn.functional as F

    from duboko import registry
    from duboko.models.transformer import TanhGELUMLP

    torch.manual_seed(0)
    default = registry.create_model("gpt-tiny")
    assert default.config.activation == "gelu" and not any(isinstance(m, TanhGELUMLP) for m in default.modules())
    tanh = registry.create_model("gpt-tiny", activation="gelu_tanh")
    tanh.load_state_dict(default.state_dict())  # same parameter names and shapes
    mlp = tanh.decoder.layers[0].mlp
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))
    with pytest.raises(DubokoError, match="activation"):
        registry.create_model("gpt-tiny", activation="relu")
