"""Transformer commands: `translate` (greedy or beam decoding with a seq2seq run) and `attention`
(per-layer, per-head attention maps of a GPT or seq2seq run as one PNG)."""

from __future__ import annotations

import argparse
import json
import math

from duboko.errors import DubokoError


MAX_BEAM = 100  # beam search keeps N hypotheses per step: a typo (100000) would not end


def register(sub) -> None:
    p = sub.add_parser(
        "translate",
        help="translate TEXT with a trained seq2seq run (greedy or beam search)",
        description="Encode TEXT with a seq2seq run's tokenizer and decode the output greedily "
        "(--beam 1, the default) or with beam search (--beam N).",
        epilog='examples:\n  duboko translate runs/s2s "907305"\n  duboko translate runs/s2s "907305" "12" --beam 4 --json',
    )
    p.add_argument("run", help="run folder of a seq2seq run (duboko train numbers-seq2seq --out RUN)")
    p.add_argument("text", nargs="+", help="source text(s) to translate, e.g. 907305")
    p.add_argument("--beam", type=int, default=1, metavar="N", help=f"beam size, 1-{MAX_BEAM} (default 1: greedy decoding)")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   metavar="ALPHA", help="beam search length penalty α of GNMT, a finite number >= 0 (default 0: none)")
    p.add_argument("--max-new-tokens", type=int, default=0, metavar="N",
                   help="longest output in tokens (>= 0; default 0: the model's max_len)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser(
        "attention",
        help="draw the attention weights of every layer and head for a prompt (PNG)",
        description="Run PROMPT through a GPT (language-model) or seq2seq run and draw each "
        "attention module's weights, one row per layer (and kind: encoder self, decoder self, "
        "cross) and one column per head. Rows of a map are queries, columns the keys they attend to.",
        epilog='example:\n  duboko attention runs/gpt --prompt "To be, or not to be" --out attn.png',
    )
    p.add_argument("run", help="run folder of a language-model (GPT) or seq2seq run")
    p.add_argument("--prompt", required=True, help="text to run through the model (not empty)")
    p.add_argument("--out", default="attention.png", metavar="PNG", help="picture to write (default attention.png)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.set_defaults(func=cmd_attention)


def cmd_translate(args: argparse.Namespace) -> int:
    from duboko.train.verify import load_run_of

    if not 1 <= args.beam <= MAX_BEAM:
        raise DubokoError(f"--beam must be in 1..{MAX_BEAM}, got {args.beam}")
    if not (math.isfinite(args.length_penalty) and args.length_penalty >= 0):
        raise DubokoError(f"--length-penalty must be a finite number >= 0, got {args.length_penalty}")
    if args.max_new_tokens < 0:
        raise DubokoError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    loaded = load_run_of(args.run, ("seq2seq",), args.device)
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


def cmd_attention(args: argparse.Namespace) -> int:
    from duboko.evaluate.attention import collect_attention, plot_attention
    from duboko.train.verify import load_run_of

    if not args.prompt:
        raise DubokoError("--prompt must not be empty")
    from duboko.evaluate.plots import check_png_output

    check_png_output(args.out)
    loaded = load_run_of(args.run, ("language-model", "seq2seq"), args.device)
    maps, note = collect_attention(loaded.model, loaded.task, args.prompt)
    plot_attention(maps, args.out, title=f"{loaded.config.recipe}: {note}  (rows: queries, columns: keys)")
    heads = maps[0].weights.shape[0]
    print(f"wrote {args.out}: {len(maps)} attention modules × {heads} heads for {note}")
    return 0
