"""Trust commands: `import-weights` (the one explicit way in for a PyTorch `.pt` file) and
`verify` (check a run folder against its manifest before using it). The checks themselves live
in `duboko.train.verify`: the .pt file is read with `torch.load(weights_only=True)` (no code
runs) and written out as safetensors, the only format the rest of duboko loads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from duboko.errors import DubokoError


def register(sub) -> None:
    p = sub.add_parser(
        "import-weights",
        help="convert a PyTorch .pt state dict to safetensors (weights_only=True)",
        description="Convert a state dict saved with torch.save (a .pt/.pth file) into a duboko "
        "safetensors weights file for model NAME. The file is read with torch.load(weights_only=True): "
        "tensors and plain containers only; any other object in the pickle is refused and no code runs. "
        "The weights must fit the model exactly (names and shapes).",
        epilog="examples:\n"
        "  duboko import-weights primer_mynet.pt --model my_net --out my_net.safetensors\n"
        "  duboko import-weights small.pt --model my_net --set image_size=16 --out small.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="a .pt/.pth file written by torch.save (a state dict, or a dict holding one)")
    p.add_argument("--model", required=True, help="registered model name (see `duboko models`)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file (refused if it exists, unless --overwrite)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config field, e.g. image_size=16 (repeatable)")
    p.add_argument("--key", metavar="KEY", help="take the state dict from this key of a checkpoint dict "
                   "(default: the dict itself, else the state dict nested under a usual key such as state_dict or model)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_import_weights)

    p = sub.add_parser(
        "verify",
        help="check a run folder against its manifest (SHA-256 of each file)",
        description="Check that every file listed in RUN/manifest.json is present and matches its SHA-256, and "
        "that the weight and state files are safetensors (never pickles), that the core files (config, weights, "
        "and metrics.json of a finished run) are listed, and that no JSON/CSV/safetensors file is unlisted. "
        "What an --overwrite killed mid-way left beside the folder (.RUN.overwritten-PID, .RUN.overwriting-PID) "
        "is settled first: the previous run is put back, or deleted when the new run has its own checkpoint. "
        "Exit 0 when the folder is intact, 2 with one line naming the first bad file otherwise.",
    )
    p.add_argument("run", help="run folder written by `duboko train`")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_verify)


def cmd_import_weights(args) -> int:
    from duboko.config import parse_overrides
    from duboko.train.verify import import_weights

    src, out = Path(args.src), Path(args.out)
    if out.suffix != ".safetensors":
        raise DubokoError(f"--out must end in .safetensors, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise DubokoError(f"{out} already exists; pass --overwrite to replace it")
    from duboko.cli.basics import check_model_set_types, check_model_size

    overrides = {k.removeprefix("model."): v for k, v in parse_overrides(args.overrides)}
    check_model_set_types(args.model, overrides)
    check_model_size(args.model, overrides)
    imported = import_weights(src, out, args.model, overrides, args.key)
    print(f"imported {imported.tensors} tensors ({imported.values:,} values) from {src} into {out} for model {args.model}")
    return 0


def cmd_verify(args) -> int:
    from duboko.train.verify import verify_run

    result = verify_run(Path(args.run))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.run}: ok, {len(result['files'])} files match manifest.json ({', '.join(result['files'])})")
    return 0
