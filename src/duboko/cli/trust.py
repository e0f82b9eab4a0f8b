"""Trust commands: `import-weights` (the one explicit way in for a PyTorch `.pt` file) and
`verify` (check a run folder against its manifest before using it).

duboko itself never unpickles: run folders hold safetensors and JSON only, and every loader
refuses a pickle. A state dict saved with `torch.save` (for example by the primer's own code) is
converted once, here, with `torch.load(..., weights_only=True)`, PyTorch's restricted unpickler
that builds tensors and plain containers and refuses any other global (no code runs). The output
is a safetensors file that the rest of duboko can load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Keys under which training scripts commonly nest a state dict inside a checkpoint dict.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
# Prefixes added by DDP (`module.`) and torch.compile (`_orig_mod.`) to parameter names.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config field, e.g. image_size=16 (repeatable)")
    p.add_argument("--key", help="take the state dict from this key of a checkpoint dict "
                   f"(default: the dict itself, else one of {', '.join(NESTED_KEYS)})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_import_weights)

    p = sub.add_parser(
        "verify",
        help="check a run folder against its manifest (SHA-256 of each file)",
        description="Check that every file listed in RUN/manifest.json is present and matches its SHA-256, and "
        "that the weight and state files are safetensors (never pickles). Exit 0 when the folder is intact, "
        "2 with one line naming the first bad file otherwise.",
    )
    p.add_argument("run", help="run folder written by `duboko train`")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_verify)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_torch_file(src: Path):
    """`torch.load(src, weights_only=True)` with every failure turned into one DubokoError line."""
    import pickle
    import zipfile

    import torch

    from duboko.errors import DubokoError

    if not src.is_file():
        raise DubokoError(f"{src} does not exist (expected a .pt file written by torch.save)")
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # PyTorch's message is many lines; its first names the refused global.
        detail = _one_line(exc).removeprefix("Weights only load failed.").strip() or "a forbidden object"
        raise DubokoError(
            f"refused {src}: it holds more than tensors and plain containers, and loading it could run code "
            f"({detail[:200]}); only state dicts of tensors are imported"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, KeyError) as exc:
        raise DubokoError(f"{src} is not a readable torch.save file ({_one_line(exc)[:200]})") from exc


def extract_state_dict(obj, src: Path, key: str | None = None) -> dict:
    import torch

    from duboko.errors import DubokoError

    def is_state_dict(d) -> bool:
        return isinstance(d, dict) and bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else []
            raise DubokoError(f"{src} has no key {key!r}; its top-level keys: {', '.join(keys) or '(not a dict)'}")
        obj = obj[key]
    if not is_state_dict(obj) and isinstance(obj, dict) and key is None:
        for k in NESTED_KEYS:
            if is_state_dict(obj.get(k)):
                obj = obj[k]
                break
    if not is_state_dict(obj):
        what = f"a dict with keys {', '.join(sorted(map(str, obj))[:10])}" if isinstance(obj, dict) else type(obj).__name__
        raise DubokoError(f"{src} holds {what}, not a state dict of named tensors; pass --key NAME to pick one")
    out = {}
    for name, tensor in obj.items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = tensor
    return out


def cmd_import_weights(args) -> int:
    import dataclasses

    from duboko import registry
    from duboko.config import parse_overrides
    from duboko.errors import DubokoError
    from duboko.io import save_tensors, sha256_file

    src, out = Path(args.src), Path(args.out)
    if out.suffix != ".safetensors":
        raise DubokoError(f"--out must end in .safetensors, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise DubokoError(f"{out} already exists; pass --overwrite to replace it")
    overrides = dict(parse_overrides(args.overrides))
    model = registry.create_model(args.model, **overrides)
    state = extract_state_dict(read_torch_file(src), src, args.key)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise DubokoError(
            f"{src} does not fit model {args.model!r}: "
            + "; ".join(p for p in (f"missing {', '.join(missing[:5])}" if missing else "",
                                    f"unexpected {', '.join(unexpected[:5])}" if unexpected else "") if p)
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise DubokoError(
                f"{src} does not fit model {args.model!r}: {k} has shape {tuple(state[k].shape)}, "
                f"the model expects {tuple(v.shape)} (set the model's fields with --set, e.g. image_size=...)"
            )
        if not (state[k].is_floating_point() or not v.is_floating_point()):
            raise DubokoError(f"{src}: {k} is {state[k].dtype}, expected a floating-point tensor")
    model.load_state_dict(state, strict=True)
    config = {"name": args.model, **dataclasses.asdict(model.config)}
    meta = {"model": args.model, "model_config": json.dumps(config), "format": "duboko",
            "imported_from": src.name, "source_sha256": sha256_file(src)}
    save_tensors(model.state_dict(), out, metadata=meta)
    n = sum(v.numel() for v in model.state_dict().values())
    print(f"imported {len(state)} tensors ({n:,} values) from {src} into {out} for model {args.model}")
    return 0


def verify_run(run_dir: Path) -> dict:
    """Manifest check plus: the listed safetensors files parse as safetensors (no pickle)."""
    from duboko.errors import DubokoError
    from duboko.io import read_json
    from duboko.train.run import MANIFEST, verify_manifest

    if not run_dir.is_dir():
        raise DubokoError(f"run folder {str(run_dir)!r} does not exist")
    verify_manifest(run_dir)
    listed = read_json(run_dir / MANIFEST).get("sha256", {})
    if not isinstance(listed, dict) or not listed:
        raise DubokoError(f"{run_dir / MANIFEST} lists no files")
    from safetensors import safe_open

    for name in listed:
        if name.endswith(".safetensors"):
            path = run_dir / name
            with open(path, "rb") as f:
                head = f.read(2)
            if head[:1] == b"\x80" or head == b"PK":
                raise DubokoError(f"{path} is a pickle or a torch.save zip, which duboko never loads")
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as exc:  # safetensors raises several types for bad data
                raise DubokoError(f"{path} is not a valid safetensors file ({_one_line(exc)})") from exc
    return {"run": str(run_dir), "ok": True, "files": sorted(listed)}


def cmd_verify(args) -> int:
    result = verify_run(Path(args.run))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.run}: ok, {len(result['files'])} files match manifest.json ({', '.join(result['files'])})")
    return 0
