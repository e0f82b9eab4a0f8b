"""`duboko scan PATH...`: is a model file safe to load? The files are read, never loaded: pickle
opcodes are walked without running them, safetensors headers are checked without reading the
tensors (`duboko.security.scan`).
"""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "scan",
        help="check model files (pickles, torch checkpoints, .npy/.npz, safetensors) without loading them",
        description="Read each file (and every file under each folder) without loading it: list every global "
        "its pickles import, flag those outside a small allow-list of tensor-rebuilding names (dangerous when "
        "known-bad or unresolvable, suspicious otherwise), and check safetensors headers (offsets, overlaps, "
        "dtypes, sizes). Raw pickles of every protocol, torch zip and legacy tar checkpoints (any inner name), "
        ".npy/.npz object arrays and nested zips are read. Exit 1 when anything is dangerous or unparseable, "
        "0 when clean (or only suspicious), 2 on a usage error.",
        epilog="examples:\n"
        "  duboko scan model.pt weights.bin checkpoint.ckpt some_dir/\n"
        "  duboko scan downloads/ --json | jq '.files[] | select(.status != \"clean\")'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--verbose", "-v", action="store_true", help="also list the allowed globals and notes")
    p.set_defaults(func=cmd_scan)


def cmd_scan(args) -> int:
    from duboko.security.scan import exit_code, format_table, scan_paths, worst

    reports = scan_paths(args.paths)
    if args.json:
        print(json.dumps({"status": worst(reports), "files": [r.to_dict() for r in reports]}))
    else:
        print(format_table(reports, verbose=args.verbose))
    return exit_code(reports)
