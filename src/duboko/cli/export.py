"""Models out and in: `duboko export` (ONNX, parity-checked, optional int8) and `duboko import-hf`
(Hugging Face GPT-2 files as a run folder)."""

from __future__ import annotations

import argparse
import json

EPILOG_EXPORT = """examples:
  duboko export runs/cnn --format onnx --out cnn.onnx
  duboko export runs/gpt --format onnx --out gpt.onnx          dynamic batch and sequence length
  duboko export runs/cnn --format onnx --quantize int8 --out cnn-int8.onnx
  duboko export runs/numbers --out numbers.onnx                numbers.encoder.onnx + numbers.decoder_step.onnx
  duboko export runs/text2img --out t2i.onnx                   t2i.text_encoder.onnx + t2i.denoiser.onnx

What is exported (one graph each, dynamic batch): image classifiers (images -> logits); RNN,
LSTM and GRU language models (tokens and state -> logits and state, dynamic length; the tanh RNN
as its equivalent GRU); the GPT without cache (tokens -> logits, 2 <= T <= block_size); the
diffusion denoiser step (noisy images, timesteps[, labels] -> prediction; the sampler loop stays
with the caller).

Two graphs, two files named OUT-without-.onnx + .<graph>.onnx: seq2seq (encoder: source ->
memory; decoder_step: one token + key/value cache -> next-token logits + cache) and
text-to-image (text_encoder: prompt tokens -> context; denoiser: noisy images, timesteps,
context -> prediction).

Each graph runs in ONNX Runtime on random and real inputs at two batch sizes (and two sequence
lengths) before it is written; a max abs difference above --tolerance writes nothing. Two-graph
families also run their whole loop through ONNX Runtime first: greedy decoding must give the
same tokens as PyTorch, a short guided DDIM text-to-image run the same images (10 x tolerance)."""


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run to ONNX (checked against PyTorch first)",
                       description="Export a trained run folder as one ONNX graph (torch.onnx dynamo exporter), "
                       "checked against PyTorch in ONNX Runtime; recipe, class names and preprocessing go into "
                       "the ONNX metadata.", epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by `duboko train`")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="output format (onnx)")
    p.add_argument("--out", help="output file (default RUN/model.onnx; two-graph families write OUT's stem + .<graph>.onnx)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: dynamic quantisation of Linear/LSTM/GRU weights")
    p.add_argument("--tolerance", type=float, default=None, help="largest allowed max abs difference to PyTorch, a finite number > 0 (default 1e-4)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="Hugging Face GPT-2 files -> a duboko run folder",
                       description="Turn a Hugging Face GPT-2 folder (config.json, model.safetensors, vocab.json, "
                       "merges.txt) into a run folder for generate, next-word, attention, summary and eval. "
                       "No network: bring the files.",
                       epilog="example:\n  duboko import-hf ~/models/gpt2 --from hf-gpt2 --out runs/gpt2\n"
                       "  duboko generate runs/gpt2 --prompt \"The meaning of life is\"",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="folder in the Hugging Face layout")
    p.add_argument("--from", dest="source", default="hf-gpt2", choices=["hf-gpt2"], help="layout of the folder (hf-gpt2)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(func=cmd_import_hf)


def cmd_export(args) -> int:
    from duboko.export.onnx import DEFAULT_OPSET, DEFAULT_TOLERANCE, export_run

    report = export_run(args.run, args.out, tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                        opset=DEFAULT_OPSET if args.opset is None else args.opset,
                        quantize=None if args.quantize == "none" else args.quantize)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    for f in report.files:
        n = sum(1 for c in report.checks if c.get("graph", "") == f.graph)
        print(f"wrote {f.path} ({f.bytes / 1e6:.2f} MB, {f.family}): ONNX Runtime vs PyTorch max abs error "
              f"{f.max_abs_error:.3g} <= {report.tolerance:g} over {n} checks")
    rows = report.pipeline_checks
    if rows and rows[0]["check"] == "greedy_decode":
        same, total = sum(r["identical"] for r in rows), sum(r["sequences"] for r in rows)
        print(f"checked: greedy decoding through ONNX Runtime gives PyTorch's tokens for {same} of {total} "
              f"{rows[0]['inputs']} sources (batches {', '.join(str(r['batch']) for r in rows)})")
    elif rows:
        print(f"checked: {rows[0]['steps']}-step DDIM text-to-image (guidance {rows[0]['guidance']:g}) through ONNX "
              f"Runtime, images max abs error {max(r['max_abs_error'] for r in rows):.3g} against PyTorch "
              f"(batches {', '.join(str(r['batch']) for r in rows)})")
    if report.int8_agreement is not None:
        print(f"int8: top-1 agrees with fp32 on {report.int8_agreement * 100:.2f}% of the real parity inputs "
              "(accuracy: `duboko bench inference`)")
    return 0


def cmd_import_hf(args) -> int:
    from duboko.export.hf_gpt2 import import_hf_gpt2

    out = import_hf_gpt2(args.folder, args.out, overwrite=args.overwrite)
    print(f"wrote run folder {out} (GPT-2 from {args.folder}); try: duboko generate {out} --prompt \"Hello\"")
    return 0
