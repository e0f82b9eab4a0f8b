"""Hugging Face GPT-2 weights as a duboko run folder (no network: the user brings the files).

    import_hf_gpt2(folder, out) -> Path      `duboko import-hf DIR --from hf-gpt2 --out RUN`

The folder is the HF layout written by `GPT2LMHeadModel.save_pretrained(safe_serialization=True)`:

    config.json         model_type "gpt2", n_layer, n_head, n_embd, n_positions, vocab_size, ...
    model.safetensors   the weights (a pickle `pytorch_model.bin` is refused: it can run code)
    vocab.json + merges.txt   the byte-level BPE tokenizer (Radford et al. 2019, section 2.2)

Mapping onto `duboko.models.transformer.GPT` (Radford et al. 2019 is a pre-LN decoder with learned
positions, biases, LayerNorm eps 1e-5, GELU with the tanh approximation, a head tied to wte):

    transformer.wte.weight (V, D)             tok_emb.weight (and the tied lm_head)
    transformer.wpe.weight (P, D)             decoder.positional.embedding.weight
    h.{i}.ln_1 / ln_2 .weight/.bias           decoder.layers.{i}.ln1 / ln2
    h.{i}.attn.c_attn.weight (D, 3D) Conv1D   transposed, split into q_proj, k_proj, v_proj (D, D)
    h.{i}.attn.c_proj.weight (D, D)           transposed -> self_attn.out_proj
    h.{i}.mlp.c_fc.weight (D, 4D)             transposed -> mlp.fc1 (4D, D)
    h.{i}.mlp.c_proj.weight (4D, D)           transposed -> mlp.fc2 (D, 4D)
    transformer.ln_f                          decoder.norm

HF's Conv1D computes x @ W + b with W (in, out), torch's Linear x @ W.T + b with W (out, in): hence
the transposes. Every tensor is checked for presence and shape before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from duboko import config as C
from duboko.data.text import TOKENIZER_FILE, BPETokenizer
from duboko.errors import DubokoError
from duboko.io import atomic_write_json, load_tensors, read_json
from duboko.train.run import CONFIG, METRICS, save_weights, write_manifest

MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few hundred bytes
MAX_TOKENIZER_BYTES = 64 << 20  # GPT-2's vocab.json is 1 MB, merges.txt 0.5 MB
MAX_WEIGHTS_BYTES = 8 << 30  # GPT-2 XL in fp32 is 6.4 GB
GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # HF's names of the tanh approximation
PICKLES = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")


def _sized(path: Path, limit: int) -> Path:
    size = path.stat().st_size
    if size > limit:
        raise DubokoError(f"{path} is {size} bytes, more than the {limit} a GPT-2 file of its kind can be")
    return path


def read_gpt2_config(folder: Path) -> dict[str, Any]:
    """config.json, validated as a GPT-2 that duboko's GPT computes exactly."""
    path = folder / "config.json"
    if not path.is_file():
        raise DubokoError(f"{folder} has no config.json; expected the Hugging Face GPT-2 layout "
                          "(config.json, model.safetensors, vocab.json, merges.txt)")
    raw = read_json(_sized(path, MAX_CONFIG_BYTES))
    if not isinstance(raw, dict) or raw.get("model_type") != "gpt2":
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise DubokoError(f"{path} has model_type {got!r}; expected 'gpt2' (only GPT-2 checkpoints map onto duboko's GPT)")
    need = {"n_layer": int, "n_head": int, "n_embd": int, "n_positions": int, "vocab_size": int}
    for key, typ in need.items():
        if not isinstance(raw.get(key), typ) or raw[key] < 1:
            raise DubokoError(f"{path}: {key} must be a positive integer, got {raw.get(key)!r}")
    act = raw.get("activation_function", "gelu_new")
    if act not in GELUS:
        raise DubokoError(f"{path}: activation_function {act!r} is not GPT-2's; expected one of {', '.join(GELUS)}")
    inner = raw.get("n_inner")
    if inner not in (None, 4 * raw["n_embd"]):
        raise DubokoError(f"{path}: n_inner {inner!r} differs from 4 · n_embd = {4 * raw['n_embd']}, which duboko's GPT uses")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if eps != 1e-5:
        raise DubokoError(f"{path}: layer_norm_epsilon {eps!r}; duboko's LayerNorm uses GPT-2's 1e-5")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if raw.get(key):
            raise DubokoError(f"{path}: {key}=true changes the attention; duboko's GPT has GPT-2's plain attention")
    if raw.get("scale_attn_weights", True) is not True:
        raise DubokoError(f"{path}: scale_attn_weights=false; GPT-2 scales scores by 1/√head_dim")
    if raw.get("tie_word_embeddings", True) is not True:
        raise DubokoError(f"{path}: tie_word_embeddings=false; GPT-2's head is the token embedding")
    if raw["n_embd"] % raw["n_head"]:
        raise DubokoError(f"{path}: n_embd {raw['n_embd']} is not divisible by n_head {raw['n_head']}")
    return raw


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / "model.safetensors"
    if not path.is_file():
        pickled = [name for name in PICKLES if (folder / name).exists()]
        if pickled:
            raise DubokoError(
                f"{folder} has {pickled[0]} but no model.safetensors: duboko never loads pickles (they can run "
                f"code); check it with `duboko scan {folder / pickled[0]}` and convert it to safetensors "
                "(save_pretrained(..., safe_serialization=True)) where you trust it"
            )
        raise DubokoError(f"{folder} has no model.safetensors (sharded checkpoints are not supported)")
    tensors = load_tensors(_sized(path, MAX_WEIGHTS_BYTES))
    # GPT2LMHeadModel prefixes "transformer."; GPT2Model does not.
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def map_gpt2_state(hf: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The HF GPT-2 tensors as duboko GPT's state dict; missing or mis-shaped tensors are refused."""
    d, v, p, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in hf:
            raise DubokoError(f"model.safetensors has no tensor {key!r} (config.json says n_layer={n}, n_embd={d})")
        t = hf[key]
        if tuple(t.shape) != shape:
            raise DubokoError(f"model.safetensors: {key} has shape {tuple(t.shape)}, expected {shape} from config.json")
        return t.float()

    out = {
        "tok_emb.weight": take("wte.weight", (v, d)),
        "decoder.positional.embedding.weight": take("wpe.weight", (p, d)),
        "decoder.norm.weight": take("ln_f.weight", (d,)),
        "decoder.norm.bias": take("ln_f.bias", (d,)),
    }
    for i in range(n):
        h, o = f"h.{i}.", f"decoder.layers.{i}."
        for hf_ln, ln in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[o + ln + ".weight"] = take(h + hf_ln + ".weight", (d,))
            out[o + ln + ".bias"] = take(h + hf_ln + ".bias", (d,))
        qkv_w = take(h + "attn.c_attn.weight", (d, 3 * d)).t()  # Conv1D (D, 3D) -> Linear (3D, D)
        qkv_b = take(h + "attn.c_attn.bias", (3 * d,))
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w.chunk(3, dim=0), qkv_b.chunk(3, dim=0)):
            out[o + f"self_attn.{name}.weight"] = w.contiguous()  # (D, D)
            out[o + f"self_attn.{name}.bias"] = b.contiguous()
        out[o + "self_attn.out_proj.weight"] = take(h + "attn.c_proj.weight", (d, d)).t().contiguous()
        out[o + "self_attn.out_proj.bias"] = take(h + "attn.c_proj.bias", (d,))
        out[o + "mlp.fc1.weight"] = take(h + "mlp.c_fc.weight", (d, 4 * d)).t().contiguous()  # (4D, D)
        out[o + "mlp.fc1.bias"] = take(h + "mlp.c_fc.bias", (4 * d,))
        out[o + "mlp.fc2.weight"] = take(h + "mlp.c_proj.weight", (4 * d, d)).t().contiguous()  # (D, 4D)
        out[o + "mlp.fc2.bias"] = take(h + "mlp.c_proj.bias", (d,))
    head = hf.get("lm_head.weight")
    if head is not None and not torch.equal(head.float(), out["tok_emb.weight"]):
        raise DubokoError("model.safetensors: lm_head.weight differs from wte.weight; GPT-2's head is tied to it")
    return out


def load_gpt2_tokenizer(folder: Path) -> BPETokenizer:
    """vocab.json + merges.txt as a byte-level BPE (GPT-2's pre-tokenizer, no prefix space)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise DubokoError(f"{folder} has no {path.name}; GPT-2's tokenizer is vocab.json + merges.txt")
        _sized(path, MAX_TOKENIZER_BYTES)
    try:
        tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:
        raise DubokoError(f"{folder}: vocab.json / merges.txt are not a BPE tokenizer ({str(exc).splitlines()[0]})") from exc
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return BPETokenizer(tok)


def import_hf_gpt2(folder: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a duboko run folder (config.json, model.safetensors, tokenizer.json, metrics.json,
    manifest.json) from a Hugging Face GPT-2 folder. Everything is validated before the first write."""
    from duboko import registry

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise DubokoError(f"{str(folder)!r} is not a folder; expected the Hugging Face GPT-2 layout")
    if (out / CONFIG).exists() and not overwrite:
        raise DubokoError(f"{out} already holds a run; choose another --out or pass --overwrite")
    hf_cfg = read_gpt2_config(folder)
    tokenizer = load_gpt2_tokenizer(folder)
    if tokenizer.vocab_size != hf_cfg["vocab_size"]:
        raise DubokoError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is {hf_cfg['vocab_size']}")
    state = map_gpt2_state(_hf_tensors(folder), hf_cfg)
    model_cfg = {
        "name": "gpt2-small", "n_layer": hf_cfg["n_layer"], "n_head": hf_cfg["n_head"], "n_embd": hf_cfg["n_embd"],
        "block_size": hf_cfg["n_positions"], "vocab_size": hf_cfg["vocab_size"], "dropout": 0.0, "bias": True,
        "tie_weights": True, "positional": "learned", "mlp_ratio": 4, "activation": "gelu_tanh",
    }
    raw = {
        "recipe": f"hf-gpt2:{folder.name}",
        "description": f"GPT-2 imported from the Hugging Face files in {folder}",
        "task": "language-model",
        "model": model_cfg,
        "data": {"tokenizer": "bpe", "vocab_size": hf_cfg["vocab_size"], "seq_len": min(128, hf_cfg["n_positions"]),
                 "stateful": False, "sample_tokens": 0},
        "train": {"optimizer": "adamw", "lr": 1e-4, "epochs": 1},
    }
    cfg = C.resolve(raw)
    spec_cfg = dict(cfg.model)
    model = registry.build_model(spec_cfg.pop("name"), spec_cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DubokoError(f"the mapped GPT-2 tensors do not fit duboko's GPT: {str(exc).splitlines()[0]}") from exc
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG, cfg.to_dict())
    save_weights(out, model, cfg)
    tokenizer.save(out / TOKENIZER_FILE)
    atomic_write_json(out / METRICS, {"imported_from": str(folder), "format": "hf-gpt2",
                                      "parameters": sum(p.numel() for p in model.parameters())})
    write_manifest(out, [TOKENIZER_FILE])
    return out
