"""`duboko prepare-text`: tokenize a corpus once into a memory-mapped token folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from duboko.errors import DubokoError

EPILOG = """examples:
  duboko prepare-text corpus/ --tokenizer bpe --vocab-size 8192 --out tokens/
  duboko train shakespeare-gpt --data-dir tokens/ --out runs/streamed

Writes OUT/train.bin and OUT/val.bin (flat uint16 arrays, uint32 above 65536 tokens), the
tokenizer (OUT/tokenizer.json) and a header (OUT/tokens.json: tokenizer, counts, dtype, split,
source files, sha256). The corpus is read in chunks, never whole; the split is the language-model
task's (contiguous blocks of text, some held out). word/bpe learn their vocabulary from a
random sample of at most --sample-mb of the training text."""


MAX_VOCAB = 1 << 20  # token ids are stored as uint32 above 65,536 tokens
MAX_BLOCKS = 100_000


def register(sub) -> None:
    p = sub.add_parser(
        "prepare-text", help="tokenize a text corpus once into a memory-mapped token folder (train.bin/val.bin)",
        description="Tokenize a UTF-8 text file or folder of *.txt files, streaming, into flat token arrays "
        "that `duboko train ... --data-dir OUT` memory-maps.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="a UTF-8 text file, a folder of *.txt files, or several separated by commas")
    p.add_argument("--tokenizer", default="bpe", metavar="KIND", help="char | word | bpe (byte-level BPE; default bpe)")
    p.add_argument("--vocab-size", type=int, default=0, metavar="N",
                   help=f"word/bpe vocabulary size, 0-{MAX_VOCAB:,} (default 0: 10000 word, 2000 bpe)")
    p.add_argument("--min-freq", type=int, default=1, metavar="N",
                   help="word/bpe: pieces seen fewer than N times are left out (>= 1, default 1; bpe at least 2)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="share of the text held out for validation, in (0, 1) (default 0.1)")
    p.add_argument("--split-blocks", type=int, default=10, metavar="N", help=f"contiguous blocks the text is cut into for the split (2-{MAX_BLOCKS:,}, default 10)")
    p.add_argument("--split-seed", type=int, default=0, metavar="SEED", help="which blocks go to validation (default 0)")
    p.add_argument("--sample-mb", type=float, default=32.0, metavar="MB", help="word/bpe: train the tokenizer on at most "
                   "this many million characters of training text, in (0, 4096] (default 32)")
    p.add_argument("--out", required=True, metavar="DIR", help="the token folder to write: new, empty, or a token folder "
                   "(with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a token folder already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the header as JSON")
    p.set_defaults(func=cmd_prepare_text)


def cmd_prepare_text(args) -> int:
    from tqdm import tqdm

    from duboko.data.tokens import prepare_tokens

    if not 0 <= args.vocab_size <= MAX_VOCAB:
        raise DubokoError(f"--vocab-size must be in 0..{MAX_VOCAB:,} (0: the tokenizer's default), got {args.vocab_size}")
    if args.min_freq < 1:
        raise DubokoError(f"--min-freq must be >= 1, got {args.min_freq}")
    if not 2 <= args.split_blocks <= MAX_BLOCKS:
        raise DubokoError(f"--split-blocks must be in 2..{MAX_BLOCKS:,}, got {args.split_blocks}")
    out = Path(args.out)
    if out.is_dir() and not (out / "tokens.json").exists() and any(out.iterdir()):
        raise DubokoError(f"--out {args.out} is a folder with other files in it, not a token folder; "
                          "give a new or empty folder")
    if not 0 < args.sample_mb <= 4096:
        raise DubokoError(f"--sample-mb must be in (0, 4096], got {args.sample_mb}")
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            label = {"scan": "scan (split, vocabulary)", "tokenize": "tokenize"}[stage]
            bars[stage] = tqdm(total=total, desc=label, unit="B", unit_scale=True, file=sys.stderr,
                               disable=args.quiet, mininterval=0.5)
        bar = bars[stage]
        bar.update(done - bar.n)

    try:
        header = prepare_tokens(
            args.path, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, min_freq=args.min_freq,
            val_fraction=args.val_fraction, split_blocks=args.split_blocks, split_seed=args.split_seed,
            sample_chars=int(args.sample_mb * 1e6), overwrite=args.overwrite, progress=progress,
        )
    finally:
        for bar in bars.values():
            bar.close()
    if args.json:
        print(json.dumps(header, indent=2))
    else:
        tok = header["tokenizer"]
        print(
            f"wrote {args.out}: {header['train']['tokens']:,} training + {header['val']['tokens']:,} validation "
            f"tokens ({header['dtype']}) from {header['source_count']} file(s), {header['characters']:,} characters; "
            f"tokenizer {tok['kind']} with {tok['vocab_size']} tokens; {header['seconds']:.1f} s"
        )
        print(f"train with: duboko train shakespeare-gpt --data-dir {args.out}")
    return 0
