"""Latency of `duboko serve` over real HTTP (uvicorn on 127.0.0.1, httpx as the browser).

    python benchmarks/serve_latency.py --out /tmp/serve-bench            # recipe-sized models
    python benchmarks/serve_latency.py --out /tmp/serve-bench --tiny     # seconds, for a smoke test
    python benchmarks/serve_latency.py --runs RUNS_DIR                    # your own trained runs

It measures
  - canvas -> probabilities: POST /api/classify with a 280x280 canvas PNG, median of 100 round trips;
  - time to first token and tokens/s of POST /api/generate (server-sent events) for a GPT and an LSTM;
  - seconds for a 16-image DDIM-50 grid (POST /api/sample, no trajectory frames).

Without --runs it trains each recipe (mnist-cnn, shakespeare-gpt, shakespeare-lstm,
mnist-diffusion-class) for ONE optimizer step: the architecture and sizes of the recipe, so the
timings are those of a trained run (latency does not depend on the weights' values), in minutes
instead of hours. Prints a table and writes latency.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the uvicorn-in-a-thread helper of tests/test_serve_api.py

ONE_STEP = ["train.max_steps=1", "train.epochs=1", "train.warmup_steps=0"]
RECIPE_RUNS = {  # run name -> (recipe, overrides that keep the recipe's model and cut the evaluation)
    "cnn": ("mnist-cnn", ONE_STEP + ["data.limit_test=200", "data.val_fraction=0"]),
    "gpt": ("shakespeare-gpt", ONE_STEP + ["data.max_eval_tokens=2000", "data.sample_tokens=0"]),
    "lstm": ("shakespeare-lstm", ONE_STEP + ["data.max_eval_tokens=2000", "data.sample_tokens=0"]),
    "ddpm": ("mnist-diffusion-class", ONE_STEP + ["data.limit_train=64", "data.val_size=16", "data.eval_samples=0",
                                                  "data.grid_rows=1", "data.grid_steps=2", "train.ema_decay=0"]),
}


def canvas_png() -> str:
    img = np.zeros((280, 280), np.uint8)
    img[60:220, 130:150] = 255  # one stroke, as drawn on the page
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def train_runs(root: Path, tiny: bool) -> None:
    from duboko import config as C
    from duboko.train.engine import fit

    if tiny:
        from test_serve_api import TINY_RUNS, train_tiny_runs

        train_tiny_runs(root, [n for n in ("cnn", "gpt", "lstm", "ddpm") if n in TINY_RUNS and not (root / n).exists()])
        return
    for name, (recipe, overrides) in RECIPE_RUNS.items():
        if not (root / name / "metrics.json").is_file():
            t0 = time.perf_counter()
            fit(C.resolve(recipe, overrides), root / name, quiet=True)
            print(f"trained {name} ({recipe}, 1 step) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def stream(http, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first, pieces, stats = None, 0, None
    with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "token":
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - t0
                elif event == "done":
                    stats = json.loads(line[6:])
                elif event == "error":
                    raise RuntimeError(line)
    total = time.perf_counter() - t0
    return {"first_token_s": first, "total_s": total, "tokens": stats["tokens"],
            "tokens_per_s": stats["tokens"] / total, "server_first_token_s": stats["first_token_seconds"]}


def main() -> int:
    import httpx
    import torch

    from test_serve_api import Server

    from duboko.serve.app import create_app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/serve-bench", help="folder for the runs and latency.json")
    parser.add_argument("--runs", help="use these run folders (cnn, gpt, lstm, ddpm under it) instead of training")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny runs (a smoke test, not a measurement)")
    parser.add_argument("--repeats", type=int, default=100, help="classify round trips (default 100)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per generation (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the machine's cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    root = Path(args.runs) if args.runs else out / ("tiny-runs" if args.tiny else "runs")
    if not args.runs:
        train_runs(root, args.tiny)
    app = create_app([root])
    results: dict = {"runs": str(root), "kind": "tiny test runs" if args.tiny else "recipe-sized, 1 training step",
                     "threads": args.threads}
    with Server(app) as server, httpx.Client(timeout=600) as http:
        image = canvas_png()
        body = {"run": "cnn", "image": image, "top": 10}
        http.post(f"{server.url}/api/classify", json=body).raise_for_status()  # loads the model
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            http.post(f"{server.url}/api/classify", json=body).raise_for_status()
            times.append(time.perf_counter() - t0)
        results["classify_ms_median"] = 1000 * statistics.median(times)
        results["classify_ms_p90"] = 1000 * sorted(times)[int(0.9 * len(times)) - 1]
        for name in ("gpt", "lstm"):
            url = f"{server.url}/api/generate"
            body = {"run": name, "prompt": "ROMEO:\n", "max_new_tokens": args.tokens, "seed": 0, "temperature": 0.8}
            stream(http, url, {**body, "max_new_tokens": 5})  # loads the model
            runs = [stream(http, url, body) for _ in range(3)]
            results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        body = {"run": "ddpm", "n": 16, "steps": 50, "frames": 0, "seed": 0, "label": 7}
        http.post(f"{server.url}/api/sample", json={**body, "n": 1, "steps": 1}).raise_for_status()  # loads
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            http.post(f"{server.url}/api/sample", json=body).raise_for_status()
            seconds.append(time.perf_counter() - t0)
        results["ddim50_grid16_s"] = min(seconds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(results, indent=2))
    print(f"runs: {results['runs']} ({results['kind']}), torch threads {args.threads}")
    print(f"canvas -> probabilities   median {results['classify_ms_median']:.1f} ms  (p90 {results['classify_ms_p90']:.1f} ms, "
          f"{args.repeats} round trips)")
    for name in ("gpt", "lstm"):
        r = results[name]
        print(f"{name:<5} first token {1000 * r['first_token_s']:.1f} ms, {r['tokens_per_s']:.0f} tokens/s "
              f"({r['tokens']} tokens, median of 3)")
    print(f"16-image DDIM-50 grid      {results['ddim50_grid16_s']:.2f} s (best of 2)")
    print(f"wrote {out / 'latency.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
