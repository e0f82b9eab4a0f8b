"""`duboko bench generate`: interactive text generation speed, batch 1, through `nn.sampling.generate`.

For each language-model recipe (default: the GPT and the LSTM of the bundled Shakespeare) the
model is built at the recipe's size, or loaded from a trained run folder with `--run`. Untrained
weights are as fast as trained ones (the same matmuls), so the default needs no training; the
record says which weights it used. Each repeat generates `new_tokens` tokens after a prompt of
`prompt_tokens` tokens, with the key/value cache (GPT) or the carried hidden state (RNNs), and
records:

* time to first token: from the call to the first sampled token (the prompt's prefill + one sample);
* decode tokens/s: the tokens after the first, over the time after the first;
* tokens per CPU-second of the process (on a shared machine the wall-clock rate depends on the
  neighbours' load; the CPU-time rate much less, and with one thread it is one free core's rate);
* the same run without the cache (`use_cache=False`: the whole context re-fed per token), to show
  what the cache buys.

The GPT's context is cropped at block_size; prompt + new tokens default to within one window, so
every new token takes the cached path (beyond the window a learned-position GPT re-encodes the last
block_size tokens per token, see models/transformer.py).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from duboko import config as C
from duboko.bench import common
from duboko.errors import DubokoError
from duboko.precision import autocast, resolve_precision

DEFAULT_RECIPES = ("shakespeare-gpt", "shakespeare-lstm")
MAX_NEW_TOKENS = 4096


def _timed_generate(model, prompt: list[int], new_tokens: int, *, use_cache: bool, device: torch.device,
                    precision: str, seed: int) -> dict[str, float]:
    from duboko.nn.sampling import generate

    stamps: list[float] = []
    common.sync(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    with autocast(device, precision):
        out = generate(model, prompt, new_tokens, temperature=1.0, top_k=0, seed=seed, use_cache=use_cache,
                       on_token=lambda _t: stamps.append(time.perf_counter()))
    common.sync(device)
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    first = stamps[0] - start
    rest = stamps[-1] - stamps[0]
    return {"tokens": len(out), "seconds": total, "cpu_seconds": cpu, "first_token_s": first,
            "decode_tokens_per_s": (len(out) - 1) / rest if rest > 0 else float("nan")}


def _model_for(recipe: str, run: str | None, overrides: list[str], device: str):
    """(model in eval mode, tokenizer, recipe name, which weights) for a recipe or a run folder."""
    if run:
        from duboko.train.verify import load_run_of

        loaded = load_run_of(run, ("language-model",), device)
        return loaded.model, loaded.task.tokenizer, loaded.config.recipe, f"trained ({run})"
    cfg = C.resolve(recipe, list(overrides))
    if cfg.task != "language-model":
        raise DubokoError(f"bench generate needs language-model recipes; {recipe!r} is a {cfg.task!r} recipe")
    trainer = common.EngineTrainer(cfg, device)  # builds the task (tokenizer) and the model at the recipe's size
    model = trainer.model
    model.eval()
    return model, trainer.task.tokenizer, recipe, "untrained (recipe size; speed does not depend on the weights)"


def bench_one(recipe: str, *, run: str | None = None, overrides: list[str] | None = None, prompt_tokens: int = 16,
              new_tokens: int = 100, repeats: int = 3, no_cache_tokens: int = 50, precision: str = "fp32",
              device: str = "cpu", seed: int = 0, threads: int = 0) -> dict[str, Any]:
    model, tokenizer, name, weights = _model_for(recipe, run, overrides or [], device)
    if threads:  # after the model: building it applies the recipe's train.num_threads
        torch.set_num_threads(threads)
    dev = next(model.parameters()).device
    prec = resolve_precision(precision, dev)
    text = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
    prompt = (tokenizer.encode(text) * (prompt_tokens // max(1, len(tokenizer.encode(text))) + 1))[:prompt_tokens]
    if not prompt:
        raise DubokoError(f"the benchmark prompt encodes to no tokens with {name!r}'s tokenizer")
    _timed_generate(model, prompt, min(8, new_tokens), use_cache=True, device=dev, precision=prec, seed=seed)  # warm-up
    cached = [_timed_generate(model, prompt, new_tokens, use_cache=True, device=dev, precision=prec, seed=seed + i)
              for i in range(repeats)]
    row: dict[str, Any] = {
        "recipe": name,
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": weights,
        "precision": prec,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "block_size": getattr(model.config, "block_size", None),
        "tokens_per_s": round(statistics.median(r["decode_tokens_per_s"] for r in cached), 1),
        "tokens_per_s_runs": [round(r["decode_tokens_per_s"], 1) for r in cached],
        "first_token_ms": round(1000 * statistics.median(r["first_token_s"] for r in cached), 2),
        "end_to_end_tokens_per_s": round(statistics.median(r["tokens"] / r["seconds"] for r in cached), 1),
        # Tokens per second of this process's CPU time (all its threads): on a shared machine the
        # wall-clock rate depends on the neighbours, this one much less; with 1 thread it is what
        # one free core would give.
        "tokens_per_cpu_s": round(statistics.median(r["tokens"] / r["cpu_seconds"] for r in cached if r["cpu_seconds"] > 0), 1),
    }
    if no_cache_tokens:
        plain = _timed_generate(model, prompt, no_cache_tokens, use_cache=False, device=dev, precision=prec, seed=seed)
        row["no_cache_tokens_per_s"] = round(plain["decode_tokens_per_s"], 1)
        row["cache_speedup"] = round(row["tokens_per_s"] / plain["decode_tokens_per_s"], 2)
    return row


def run_generate(*, recipes: list[str] | None = None, runs: list[str] | None = None, overrides: list[str] | None = None,
                 prompt_tokens: int = 16, new_tokens: int = 100, repeats: int = 3, no_cache_tokens: int = 50,
                 precision: str = "fp32", device: str = "auto", threads: int = 0, target: float = 1000.0) -> dict[str, Any]:
    if not 1 <= new_tokens <= MAX_NEW_TOKENS or not 1 <= prompt_tokens <= MAX_NEW_TOKENS:
        raise DubokoError(f"--new-tokens and --prompt-tokens must be in 1..{MAX_NEW_TOKENS}, got {new_tokens}, {prompt_tokens}")
    if repeats < 1 or no_cache_tokens < 0:
        raise DubokoError(f"--repeats must be >= 1 and --no-cache-tokens >= 0, got {repeats}, {no_cache_tokens}")
    from duboko.train.run import pick_device

    dev = pick_device(device)
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    hw = common.hardware(dev)
    rows = []
    try:
        targets = [(None, r) for r in runs] if runs else [(r, None) for r in (recipes or DEFAULT_RECIPES)]
        for recipe, run in targets:
            # A recipe's train.num_threads (the LSTM's 2) must not leak into the next row.
            torch.set_num_threads(threads or default_threads)
            row = bench_one(recipe or "", run=run, overrides=overrides, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                            repeats=repeats, no_cache_tokens=no_cache_tokens, precision=precision, device=str(dev),
                            threads=threads)
            row["torch_threads"] = torch.get_num_threads()
            row["meets_target"] = row["tokens_per_s"] >= target
            rows.append(row)
    finally:
        torch.set_num_threads(default_threads)
    hw["load_average_end"] = common.hardware(dev).get("load_average")
    return {"benchmark": "generate", "unit": "tokens", "hardware": hw, "target_tokens_per_s": target,
            "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "batch_size": 1,
                         "sampling": "temperature 1, no top-k/top-p", "precision": precision, "overrides": overrides or []},
            "models": rows, "wall_seconds": round(time.perf_counter() - start, 2)}


def format_report(result: dict[str, Any]) -> str:
    rows = []
    for r in result["models"]:
        rows.append([r["recipe"], r["model"], f"{r['parameters']:,}", r["precision"], str(r["torch_threads"]),
                     f"{r['first_token_ms']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_cpu_s']:.0f}",
                     f"{r.get('no_cache_tokens_per_s', float('nan')):.0f}",
                     f"{r.get('cache_speedup', float('nan')):.1f}x", "yes" if r["meets_target"] else "NO"])
    header = ["recipe", "model", "params", "precision", "threads", "first token ms", "tokens/s (cache)", "per CPU-s",
              "tokens/s (no cache)", "cache", f">= {result['target_tokens_per_s']:.0f}/s"]
    s = result["settings"]
    weights = sorted({r["weights"] for r in result["models"]})
    return "\n".join([_hardware_line(result["hardware"]),
                      f"batch 1, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens × {s['repeats']} (median); "
                      f"weights: {'; '.join(weights)}",
                      common.format_table(rows, header), f"wall {result['wall_seconds']:.1f}s"])


def _hardware_line(hw: dict[str, Any]) -> str:
    return (f"hardware: {hw.get('gpu') or hw['cpu']} | {hw['cpu_cores']} cores, {hw['cpu_capability']}, "
            f"native bf16: {'yes' if hw['cpu_bf16_native'] else 'no'}, torch {hw['torch']} | load average "
            f"{hw.get('load_average')} -> {hw.get('load_average_end')}")
