"""Text commands: `generate` (sample from a trained language model, streamed), `next-word`
(rank the next token with probabilities) and `gradflow` (vanishing gradients, plotted)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from duboko.errors import DubokoError

# Generation is one forward pass per token: a bound keeps a typo (10**9) from running forever.
MAX_NEW_TOKENS = 100_000
# gradflow backpropagates through BATCH windows of STEPS tokens at once (memory ~ their product).
MAX_GRADFLOW_STEPS = 10_000
MAX_GRADFLOW_BATCH = 1024


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a trained language model (RNN or GPT), streamed to the terminal",
        description="Sample a continuation of --prompt from a trained language-model run folder. "
        "Text is printed as it is produced. The same --seed gives the same text.",
        epilog="examples:\n  duboko generate runs/gpt --prompt \"ROMEO:\" --max-new-tokens 200\n"
        "  duboko generate runs/gpt --prompt \"ROMEO:\" --temperature 0     # greedy\n"
        "  duboko generate runs/lstm --top-k 20 --top-p 0.9 --seed 1 --stop $'\\n\\n'",
    )
    p.add_argument("run", help="run folder of a language-model run (duboko train shakespeare-gpt --out RUN)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=400, metavar="N",
                   help=f"tokens to generate (1-{MAX_NEW_TOKENS:,}, default 400)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="softmax temperature, a finite number >= 0; lower is more conservative, 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only from the K most likely tokens (>= 0; default 0: off)")
    p.add_argument("--top-p", type=float, default=1.0,
                   metavar="P", help="nucleus sampling: the smallest set of tokens with probability P, in (0, 1] (default 1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   metavar="X", help="divide the logits of tokens already in the text by X, finite and > 0 (>1 repeats less; "
                   "default 1: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable; e.g. --stop $'\\n\\n')")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples (default: a fresh one)")
    p.add_argument("--no-cache", action="store_true",
                   help="re-feed the whole context every step instead of carrying the state/KV cache")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--no-prompt", action="store_true", help="print only the generated text, not the prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "next-word",
        help="rank the most likely next tokens after a text, with probabilities",
        description="Show the --top most likely next tokens (words for a word-level model, "
        "characters or BPE pieces otherwise) after TEXT, with their probabilities.",
        epilog="example:\n  duboko next-word runs/word-lstm \"The cat sat on the\" --top 10",
    )
    p.add_argument("run", help="run folder of a language-model run")
    p.add_argument("text", help='the context, e.g. "The cat sat on the"')
    p.add_argument("--top", type=int, default=5, help="how many candidates (>= 1, default 5)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, a finite number > 0 (default 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_next_word)

    p = sub.add_parser(
        "gradflow",
        help="plot how the gradient of the last step's loss reaches earlier input steps (RNN vs LSTM/GRU)",
        description="For each run folder, feed validation windows of --steps tokens and plot the "
        "mean norm of d(loss at the last step)/d(input embedding at step t) against the distance "
        "T-1-t. A plain RNN's curve falls off geometrically (vanishing gradients); an LSTM's or "
        "GRU's stays up far longer.",
        epilog="example:\n  duboko gradflow runs/rnn runs/lstm --steps 100 --out gradflow.png",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders of recurrent language models (e.g. runs/rnn runs/lstm)")
    p.add_argument("--out", default="gradflow.png", metavar="PNG", help="picture to write (default gradflow.png); a .json with the numbers is written beside it")
    p.add_argument("--steps", type=int, default=200, help=f"sequence length T (2-{MAX_GRADFLOW_STEPS:,}, default 200)")
    p.add_argument("--batch", type=int, default=32, help=f"validation windows averaged (1-{MAX_GRADFLOW_BATCH}, default 32)")
    p.add_argument("--seed", type=int, default=0, help="which windows are drawn (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.set_defaults(func=cmd_gradflow)


LANGUAGE_MODEL = ("language-model",)  # the runs these commands read


def cmd_generate(args: argparse.Namespace) -> int:
    from duboko.nn.sampling import TextStreamer, generate
    from duboko.train.verify import load_run_of

    # `not (a <= x)` rather than `x < a`: NaN fails every comparison and must be refused too.
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise DubokoError(f"--max-new-tokens must be in 1..{MAX_NEW_TOKENS:,}, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise DubokoError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise DubokoError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise DubokoError(f"--top-k must be >= 0, got {args.top_k}")
    if not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        raise DubokoError(f"--repetition-penalty must be a finite number > 0, got {args.repetition_penalty}")
    loaded = load_run_of(args.run, LANGUAGE_MODEL, args.device)
    tok = loaded.task.tokenizer
    prompt = args.prompt if args.prompt else "\n"
    ids = tok.encode(prompt)
    if not ids:
        raise DubokoError(f"the prompt {args.prompt!r} encodes to no tokens")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if not args.no_prompt:
        write(prompt)
    streamer = TextStreamer(tok.decode, write, stop=args.stop)
    generate(
        loaded.model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
        decode=tok.decode, seed=args.seed, use_cache=not args.no_cache, on_token=streamer,
    )
    streamer.flush()
    write("\n")
    return 0


def cmd_next_word(args: argparse.Namespace) -> int:
    from duboko.evaluate.next_token import next_token_table
    from duboko.train.verify import load_run_of

    if args.top < 1:
        raise DubokoError(f"--top must be >= 1, got {args.top}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise DubokoError(f"--temperature must be a finite number > 0, got {args.temperature}")
    loaded = load_run_of(args.run, LANGUAGE_MODEL, args.device)
    rows = next_token_table(loaded.model, loaded.task.tokenizer, args.text, args.top, args.temperature)
    if args.json:
        print(json.dumps([{"token": t, "id": i, "probability": p} for t, i, p in rows], indent=2))
        return 0
    print(f"after {args.text!r} ({loaded.task.tokenizer.kind} tokens):")
    width = max(len(_show(t)) for t, _, _ in rows)
    for rank, (t, _, p) in enumerate(rows, 1):
        print(f"{rank:>3}. {_show(t):<{width}}  {p:7.2%}")
    return 0


def _show(token: str) -> str:
    """A token as the user reads it: words without their leading space; whitespace made visible."""
    stripped = token[1:] if token.startswith(" ") and token.strip() else token
    return stripped if stripped.strip() and stripped == stripped.strip() else repr(token)


def cmd_gradflow(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from duboko.evaluate.gradflow import gradient_by_distance, plot_gradient_flow
    from duboko.io import atomic_write_json
    from duboko.train.verify import load_run_of

    if not 2 <= args.steps <= MAX_GRADFLOW_STEPS:
        raise DubokoError(f"--steps must be in 2..{MAX_GRADFLOW_STEPS:,}, got {args.steps}")
    if not 1 <= args.batch <= MAX_GRADFLOW_BATCH:
        raise DubokoError(f"--batch must be in 1..{MAX_GRADFLOW_BATCH}, got {args.batch}")
    from duboko.evaluate.plots import check_png_output

    check_png_output(args.out)
    T = args.steps
    curves = {}
    for run in args.runs:
        loaded = load_run_of(run, LANGUAGE_MODEL, args.device)
        loaded.task._ensure_data()
        # (a token-folder run's val_ids is a read-only memmap: a bounded copy as a tensor)
        ids = torch.as_tensor(np.asarray(loaded.task.val_ids[: 1 << 22], dtype=np.int64))
        if len(ids) < T + 2:
            raise DubokoError(f"{run}: validation text has {len(ids)} tokens, fewer than --steps {T}")
        by_distance = gradient_by_distance(loaded.model, ids, T, args.batch, args.seed)  # index k = T-1-t
        cfg = loaded.config.model
        label = f"{Path(run).name} ({cfg.get('cell', cfg['name'])}, {cfg.get('num_layers', '?')}x{cfg.get('hidden_size', '?')})"
        curves[label] = by_distance
        shown = [k for k in (0, 10, 50, 100, 150, T - 1) if k < T]
        cells = "  ".join(f"k={k}: {by_distance[k]:.2e}" for k in sorted(set(shown)))
        print(f"{label}: |dL_T/dx_(T-k)|  {cells}")
    out = Path(args.out)
    plot_gradient_flow(curves, out)
    atomic_write_json(out.with_suffix(".json"), {"steps": args.steps, "batch": args.batch, "seed": args.seed,
                                                 "grad_norm_by_steps_back": curves})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
