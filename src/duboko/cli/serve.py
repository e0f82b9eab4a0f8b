"""`duboko serve`: a local web studio over run folders (the [serve] extra: fastapi, uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

EXAMPLES = """examples:
  duboko serve runs/                        # every run folder under runs/, at http://127.0.0.1:8765
  duboko serve runs/cnn runs/gpt --port 9000
"""
INSTALL_HINT = "duboko serve needs the [serve] extra (fastapi, uvicorn): pip install -e .[serve]"


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web page to play with trained runs (draw digits, stream text, sample images)",
        description="Serve one local web page over the run folders under ROOTS: each run's recipe, metrics, "
        "training curves and config, and a panel for its family (classifier canvas, text generation with "
        "streaming, attention and next-token table, seq2seq translation, diffusion sampling).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("roots", nargs="+", metavar="ROOT", help="run folders, or folders of run folders (e.g. runs/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; anything else is reachable from the network)")
    p.add_argument("--port", type=int, default=8765, help="port, 1-65535 (default 8765)")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (default cpu)")
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from duboko.errors import DubokoError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        print(f"duboko: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        raise DubokoError(f"--port must be in 1..65535, got {args.port}")
    from duboko.serve.app import create_app
    from duboko.train.run import pick_device

    pick_device(args.device)  # a bad --device is one line now, not an error on the first request

    app = create_app(args.roots, device=args.device)
    runs = app.state.index.scan()
    if not is_loopback(args.host):
        print(f"duboko: warning: --host {args.host} makes the studio reachable from other machines; it has no "
              "authentication (the default 127.0.0.1 keeps it local)", file=sys.stderr)
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"duboko studio: {len(runs)} run(s) under {', '.join(args.roots)} at http://{shown}:{args.port}  (Ctrl+C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
