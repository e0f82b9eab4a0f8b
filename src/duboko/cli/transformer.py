"""Transformer commands: `translate` (greedy or beam decoding with a seq2seq run) and `attention`
(per-layer, per-head attention maps of a GPT or seq2seq run as one PNG)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from duboko.errors import DubokoError


def register(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate TEXT with a trained seq2seq run (greedy or beam search)",
        description="Encode TEXT with a seq2seq run's tokenizer and decode the output greedily "
        "(--beam 1, the default) or with beam search (--beam N).",
        epilog='example: duboko translate runs/s2s "907305" --beam 4',
    )
    p.add_argument("run", help="run folder of a seq2seq run (duboko train numbers-seq2seq --out RUN)")
    p.add_argument("text", nargs="+", help="source text(s) to translate, e.g. 907305")
    p.add_argument("--beam", type=int, default=1, help="beam size (1: greedy decoding, the default)")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="beam search length penalty alpha (GNMT; 0: none, the default)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="longest output in tokens (0: the model's max_len)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser(
        "attention",
        help="draw the attention weights of every layer and head for a prompt (PNG)",
        description="Run PROMPT through a GPT (language-model) or seq2seq run and draw each "
        "attention module's weights, one row per layer (and kind: encoder self, decoder self, "
        "cross) and one column per head. Rows of a map are queries, columns the keys they attend to.",
        epilog='example: duboko attention runs/gpt --prompt "To be, or not to be" --out attn.png',
    )
    p.add_argument("run", help="run folder of a language-model (GPT) or seq2seq run")
    p.add_argument("--prompt", required=True, help="text to run through the model")
    p.add_argument("--out", default="attention.png", help="picture to write (default attention.png)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.set_defaults(func=cmd_attention)


def _load(run: str, device: str, tasks: tuple[str, ...]):
    from duboko.train.run import load_run

    loaded = load_run(run, device=device)
    if loaded.config.task not in tasks:
        raise DubokoError(f"{run} is a {loaded.config.task!r} run; expected a {' or '.join(tasks)} run")
    return loaded


def cmd_translate(args: argparse.Namespace) -> int:
    if args.beam < 1:
        raise DubokoError(f"--beam must be >= 1, got {args.beam}")
    if args.max_new_tokens < 0:
        raise DubokoError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    loaded = _load(args.run, args.device, ("seq2seq",))
    task, model = loaded.task, loaded.model
    results = []
    for text in args.text:
        src = task.encode_source(text)
        limit = args.max_new_tokens or None
        if args.beam == 1:
            ids = model.greedy_decode(src, limit)[0]
        else:
            ids = model.beam_search(src, args.beam, limit, args.length_penalty)[0]
        results.append({"source": text, "output": task.tokenizer.decode(ids)})
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], ensure_ascii=False))
    else:
        for r in results:
            print(r["output"] if len(results) == 1 else f"{r['source']}\t{r['output']}")
    return 0


# ---------------------------------------------------------------------------------------------
# Attention maps.


def collect_attention(loaded, prompt: str) -> tuple[list[dict], str]:
    """Run the prompt and return one entry per attention module: {"name", "weights" (H, T, S),
    "queries", "keys"} (token texts), and a note on what was run."""
    import torch

    from duboko.nn.attention import recording_attention

    model, task = loaded.model, loaded.task
    device = loaded.device
    if loaded.config.task == "seq2seq":
        src = task.encode_source(prompt)
        out_ids = model.greedy_decode(src)[0]
        tgt_in = torch.tensor([[model.config.bos_id] + out_ids], device=device)
        tok = task.tokenizer
        src_tokens = [tok.pieces[i] for i in src[0].tolist()]
        tgt_tokens = [tok.pieces[i] for i in tgt_in[0].tolist()]
        with torch.no_grad(), recording_attention(model) as modules:
            model(src, tgt_in)
        names = {id(m): n for n, m in model.named_modules()}
        maps = []
        for m in modules:
            name = names[id(m)]
            if name.startswith("encoder"):
                q, k = src_tokens, src_tokens
            elif name.endswith("cross_attn"):
                q, k = tgt_tokens, src_tokens
            else:
                q, k = tgt_tokens, tgt_tokens
            maps.append({"name": name, "weights": m.weights[0].float().cpu(), "queries": q, "keys": k})
        return maps, f"{prompt!r} -> {tok.decode(out_ids)!r}"
    tok = task.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        raise DubokoError(f"the prompt {prompt!r} encodes to no tokens")
    block = getattr(model.config, "block_size", None)
    if block:
        ids = ids[-block:]
    tokens = [tok.token_text(i) for i in ids]
    x = torch.tensor([ids], device=device)
    with torch.no_grad(), recording_attention(model) as modules:
        model(x)
    if not modules:
        raise DubokoError(f"model {loaded.config.model['name']!r} has no attention layers to draw")
    names = {id(m): n for n, m in model.named_modules()}
    maps = [{"name": names[id(m)], "weights": m.weights[0].float().cpu(), "queries": tokens, "keys": tokens} for m in modules]
    return maps, repr(prompt)


def _short_name(name: str) -> str:
    parts = name.split(".")
    stack = "enc" if parts[0] == "encoder" else "dec"
    layer = parts[2] if len(parts) > 2 else "?"
    kind = {"attn": "self", "self_attn": "self", "cross_attn": "cross"}.get(parts[-1], parts[-1])
    return f"{stack} L{layer} {kind}"


def plot_attention(maps: list[dict], path: str | Path, title: str = "") -> None:
    """One row per attention module, one column per head; queries down, keys across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    from duboko.io import atomic_write_bytes

    rows = len(maps)
    heads = max(m["weights"].shape[0] for m in maps)
    size = max(max(len(m["queries"]), len(m["keys"])) for m in maps)
    cell = min(3.2, max(1.6, 0.13 * size + 0.6))
    fig, axes = plt.subplots(rows, heads, figsize=(cell * heads + 1.0, cell * rows + 0.8), squeeze=False)
    show_ticks = size <= 40
    for r, m in enumerate(maps):
        for h in range(heads):
            ax = axes[r][h]
            if h >= m["weights"].shape[0]:
                ax.axis("off")
                continue
            # A square-root colour scale: weights spread over many keys stay visible.
            ax.imshow(m["weights"][h].numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                      aspect="auto", interpolation="nearest")
            if show_ticks:
                fs = max(3.0, min(7.0, 160.0 / size))
                ax.set_xticks(range(len(m["keys"])))
                ax.set_xticklabels([repr(t)[1:-1] for t in m["keys"]], rotation=90, fontsize=fs)
                ax.set_yticks(range(len(m["queries"])))
                ax.set_yticklabels([repr(t)[1:-1] for t in m["queries"]], fontsize=fs)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel(_short_name(m["name"]), fontsize=9)
    fig.suptitle(title or "attention weights (rows: queries, columns: keys)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def cmd_attention(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise DubokoError("--prompt must not be empty")
    loaded = _load(args.run, args.device, ("language-model", "seq2seq"))
    maps, note = collect_attention(loaded, args.prompt)
    plot_attention(maps, args.out, title=f"{loaded.config.recipe}: {note}  (rows: queries, columns: keys)")
    heads = maps[0]["weights"].shape[0]
    print(f"wrote {args.out}: {len(maps)} attention modules × {heads} heads for {note}")
    return 0
