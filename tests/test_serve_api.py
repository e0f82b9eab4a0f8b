"""`duboko serve`: every endpoint through FastAPI's test client on tiny runs trained here, each
bad input (4xx with a one-line JSON error and the allowed range), traversal attempts (`../`,
absolute paths, a symlink out of the root), the per-model queue, and a closed stream stopping
its generation on a real uvicorn server."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="duboko serve needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the dev extra)")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from duboko import config as C  # noqa: E402
from duboko.serve.app import Limits, create_app  # noqa: E402

LM = ["epochs=1", "max_steps=30", "seq_len=16", "batch_size=8", "data.max_train_tokens=4000",
      "data.max_eval_tokens=200", "data.sample_tokens=0", "train.num_threads=1", "warmup_steps=0"]
# Tiny runs (seconds each on 2 cores), the settings of tests/conftest.py and test_export_onnx.py.
TINY_RUNS = {
    "cnn": ("mnist-cnn", ["data.image_size=16", "model.image_size=16", "data.limit_train=256", "data.limit_test=100",
                          "train.num_threads=1", "data.eval_batch_size=100", "epochs=1", "data.val_fraction=0"]),
    "gpt": ("shakespeare-gpt", LM + ["n_embd=32", "n_layer=1", "block_size=32"]),
    "lstm": ("shakespeare-lstm", LM + ["hidden_size=24"]),
    "s2s": ("numbers-seq2seq", ["train_size=128", "val_size=10", "test_size=10", "epochs=1", "batch_size=64",
                                "d_model=32", "dim_feedforward=64", "num_heads=2", "num_encoder_layers=1",
                                "num_decoder_layers=1", "warmup_steps=0", "train.num_threads=1"]),
    "ddpm": ("mnist-diffusion-class", [
        "model.base_channels=8", "model.channel_mults=[1, 2]", "model.groups=4", "model.num_heads=2",
        "model.attention_resolutions=[7]", "data.limit_train=64", "data.val_size=16", "data.eval_samples=0",
        "data.grid_rows=1", "data.grid_steps=2", "data.eval_batch_size=16", "train.epochs=1",
        "train.batch_size=16", "train.warmup_steps=0", "train.ema_decay=0", "train.num_threads=1"]),
}


def train_tiny_runs(root: Path, names: list[str]) -> Path:
    """The named tiny runs as root/<name> (also used by test_serve_browser.py)."""
    from duboko.train.engine import fit

    for name in names:
        recipe, overrides = TINY_RUNS[name]
        torch.manual_seed(0)
        # No report.html / model card: their pictures would take most of the time.
        fit(C.resolve(recipe, overrides + ["train.report=false"]), root / name, quiet=True)
    return root


def digit_png(width: int = 280, height: int = 280, stroke: bool = True) -> str:
    """A data URL of a white vertical stroke on black (a "1" drawn on the canvas)."""
    img = np.zeros((height, width), np.uint8)
    if stroke:
        img[height // 5: 4 * height // 5, width // 2 - width // 28: width // 2 + width // 28] = 255
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as img:
        return img.size


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("serve")
    root = train_tiny_runs(top / "runs", list(TINY_RUNS))
    # Outside the root: a run folder reached only through a symlink inside it, and a run folder
    # whose weights are a symlink to a file outside. Neither may be listed or served.
    outside = top / "outside"
    shutil.copytree(root / "lstm", outside / "secret")
    os.symlink(outside / "secret", root / "linked-out")
    shutil.copytree(root / "lstm", root / "weights-out")
    (root / "weights-out" / "model.safetensors").unlink()
    os.symlink(outside / "secret" / "model.safetensors", root / "weights-out" / "model.safetensors")
    # A symlink that stays inside the root is fine.
    os.symlink(root / "gpt", root / "gpt-alias")
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def client(roots) -> TestClient:
    return TestClient(create_app([roots["root"]]), raise_server_exceptions=False)


def is_one_line_error(response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    for needle in needles:
        assert needle in body["error"], body["error"]
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Runs page.


def test_runs_are_listed_with_recipe_metrics_and_panel(client):
    r = client.get("/api/runs")
    assert r.status_code == 200
    runs = {run["name"]: run for run in r.json()["runs"]}
    assert set(runs) == {"cnn", "gpt", "lstm", "s2s", "ddpm", "gpt-alias"}  # no symlink out of the root
    assert runs["cnn"]["panel"] == "classifier" and runs["cnn"]["recipe"] == "mnist-cnn"
    assert runs["gpt"]["panel"] == "language-model" and runs["s2s"]["panel"] == "seq2seq"
    assert runs["ddpm"]["panel"] == "diffusion"
    assert 0 <= runs["cnn"]["metrics"]["test_accuracy"] <= 1
    assert r.json()["limits"]["max_new_tokens"] == Limits().max_new_tokens


def test_run_details_config_history_and_family(client, roots):
    r = client.get("/api/run", params={"name": "gpt"})
    assert r.status_code == 200
    run = r.json()
    assert run["config"]["model"]["n_embd"] == 32 and run["attention"] is True and run["family"] == "transformer"
    history = (roots["root"] / "gpt" / "history.csv").read_text().splitlines()
    assert len(run["history"]) == len(history) - 1 and "train_loss" in run["history"][0]
    lstm = client.get("/api/run", params={"name": "lstm"}).json()
    assert lstm["attention"] is False
    ddpm = client.get("/api/run", params={"name": "ddpm"}).json()
    assert ddpm["conditioning"] == "class" and ddpm["defaults"]["steps"] == 50


def test_page_and_its_static_files_are_served_without_external_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text


@pytest.mark.parametrize("name", ["../gpt", "/etc/passwd", "..", "gpt/../cnn", "%2e%2e/gpt", "linked-out",
                                  "weights-out", "outside/secret", "", "gpt\x00"])
def test_traversal_and_unknown_names_are_refused(client, roots, name):
    details = client.get("/api/run", params={"name": name})
    assert details.status_code in (400, 404)
    is_one_line_error(details, details.status_code)
    r = client.post("/api/next-token", json={"run": name, "text": "RO"})
    assert r.status_code in (400, 404)
    is_one_line_error(r, r.status_code)
    absolute = client.post("/api/next-token", json={"run": str(roots["root"] / "lstm"), "text": "RO"})
    is_one_line_error(absolute, 404, "no run named")


def test_static_files_come_from_a_fixed_table(client):
    for path in ("/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/runs.py", "/static/index.html.bak"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"}


def test_a_run_whose_manifest_does_not_match_is_refused(roots, tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    client = TestClient(create_app([root]), raise_server_exceptions=False)
    assert client.get("/api/runs").json()["runs"] == []
    shutil.copytree(roots["root"] / "lstm", root / "lstm")  # a run that appears while serving
    (root / "lstm" / "history.csv").write_text("epoch,train_loss\n1,0.0\n")  # tampered after training
    assert [r["name"] for r in client.get("/api/runs").json()["runs"]] == ["lstm"]
    is_one_line_error(client.get("/api/run", params={"name": "lstm"}), 400, "history.csv")
    is_one_line_error(client.post("/api/next-token", json={"run": "lstm", "text": "RO"}), 400, "history.csv")


# ---------------------------------------------------------------------------------------------
# Classifier.


def test_classify_a_drawn_stroke_matches_predict_and_shows_the_input(client, roots):
    import duboko

    r = client.post("/api/classify", json={"run": "cnn", "image": digit_png(), "top": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["top"]) == 3 and body["top"][0]["class"] in "0123456789"
    probs = [row["probability"] for row in body["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert body["input_size"] == [3, 16, 16] and body["inverted"] is False  # MY_NET reads grey as 3 channels
    assert png_size(body["input"])[0] >= 16
    # The same probabilities as the library's `Run.predict` (the `duboko predict` path).
    raw = base64.b64decode(digit_png().split(",", 1)[1])
    ref = duboko.load(roots["root"] / "cnn", device="cpu").predict(np.asarray(Image.open(io.BytesIO(raw))), top=3)[0]
    assert [row["class"] for row in body["top"]] == list(ref["probabilities"])
    assert np.allclose(probs, list(ref["probabilities"].values()), atol=1e-5)


def test_classify_bad_inputs(client):
    is_one_line_error(client.post("/api/classify", json={"run": "cnn"}), 400, "data URL")
    is_one_line_error(client.post("/api/classify", json={"run": "cnn", "image": "data:image/png;base64,@@@"}), 400, "base64")
    junk = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    is_one_line_error(client.post("/api/classify", json={"run": "cnn", "image": junk}), 400, "not a readable picture")
    big = digit_png(1100, 1000, stroke=False)
    is_one_line_error(client.post("/api/classify", json={"run": "cnn", "image": big}), 400, "1100x1000", "1,048,576")
    is_one_line_error(client.post("/api/classify", json={"run": "cnn", "image": digit_png(), "top": 0}), 400, "1..50")
    is_one_line_error(client.post("/api/classify", json={"run": "gpt", "image": digit_png()}), 400, "classifier run")


def test_body_size_and_json_are_checked(client):
    huge = json.dumps({"run": "cnn", "image": "A" * (3 * 1024 * 1024)})
    is_one_line_error(client.post("/api/classify", content=huge, headers={"content-type": "application/json"}),
                      413, "2,097,152")
    is_one_line_error(client.post("/api/classify", content=b"{not json", headers={"content-type": "application/json"}),
                      400, "not JSON")
    is_one_line_error(client.post("/api/classify", content=b"[1, 2]"), 400, "JSON object")


def test_body_without_content_length_is_capped_while_read(roots):
    client = TestClient(create_app([roots["root"]], limits=Limits(max_body_bytes=1000)), raise_server_exceptions=False)

    def chunks():
        for _ in range(10):
            yield b" " * 500

    is_one_line_error(client.post("/api/classify", content=chunks()), 413, "1,000")


# ---------------------------------------------------------------------------------------------
# Language models.


def read_events(response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_generate_streams_the_same_text_as_the_library(client, roots, name):
    import duboko

    r = client.post("/api/generate", json={"run": name, "prompt": "ROMEO:", "max_new_tokens": 25, "seed": 3,
                                           "temperature": 0.9, "top_k": 20, "top_p": 0.95})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = read_events(r)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("token") >= 2 and "error" not in kinds
    text = "".join(d["text"] for k, d in events if k == "token")
    assert events[-1][1]["tokens"] == 25 and events[-1][1]["first_token_seconds"] is not None
    ref = duboko.load(roots["root"] / name, device="cpu").generate("ROMEO:", 25, 0.9, 20, 0.95, seed=3)
    assert text == ref


def test_generate_bad_inputs(client):
    cases = [
        ({"run": "gpt", "max_new_tokens": 0}, "max_new_tokens must be an integer in 1..1000"),
        ({"run": "gpt", "max_new_tokens": 5000}, "1..1000, got 5000"),
        ({"run": "gpt", "temperature": -1}, "temperature must be a number in [0, 10]"),
        ({"run": "gpt", "top_p": 0}, "top_p must be a number in (0, 1]"),
        ({"run": "gpt", "top_k": -2}, "top_k must be an integer"),
        ({"run": "gpt", "top_k": 2.5}, "top_k must be an integer"),
        ({"run": "gpt", "seed": "1"}, "seed must be an integer"),
        ({"run": "gpt", "prompt": 5}, "prompt must be a string"),
        ({"run": "gpt", "prompt": "x" * 3000}, "at most 2,000"),
        ({"run": "gpt", "prompt": "\u4e2d\u6587"}, "not in this model's vocabulary"),
        ({"run": "cnn", "prompt": "a"}, "language-model run"),
        ({"prompt": "a"}, "run's name"),
    ]
    for body, needle in cases:
        is_one_line_error(client.post("/api/generate", json=body), 400, needle)
    nan = b'{"run": "gpt", "temperature": NaN}'
    is_one_line_error(client.post("/api/generate", content=nan), 400, "temperature must be a number")


def test_next_token_table_matches_the_library(client, roots):
    from duboko.evaluate.next_token import next_token_table
    from duboko.train.run import load_run

    r = client.post("/api/next-token", json={"run": "lstm", "text": "ROMEO", "top": 4, "temperature": 1.0})
    assert r.status_code == 200
    rows = r.json()["rows"]
    loaded = load_run(roots["root"] / "lstm", device="cpu")
    ref = next_token_table(loaded.model, loaded.task.tokenizer, "ROMEO", 4)
    assert [(row["token"], row["id"]) for row in rows] == [(t, i) for t, i, _ in ref]
    assert np.allclose([row["probability"] for row in rows], [p for _, _, p in ref], atol=1e-6)
    is_one_line_error(client.post("/api/next-token", json={"run": "lstm", "text": "RO", "top": 51}), 400, "1..50")
    is_one_line_error(client.post("/api/next-token", json={"run": "lstm", "text": "RO", "temperature": 0}), 400, "(0, 10]")
    is_one_line_error(client.post("/api/next-token", json={"run": "lstm", "text": "   "}), 400, "must not be empty")


def test_attention_map_of_the_last_layer(client, roots):
    from duboko.evaluate.attention import collect_attention
    from duboko.train.run import load_run

    r = client.post("/api/attention", json={"run": "gpt", "text": "ROMEO"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == list("ROMEO")
    heads = np.array(body["heads"])  # (H, T, T), causal rows summing to 1
    assert heads.shape[1:] == (5, 5)
    assert np.allclose(heads.sum(-1), 1, atol=1e-3) and np.allclose(np.triu(heads, 1), 0, atol=1e-6)
    loaded = load_run(roots["root"] / "gpt", device="cpu")
    maps, _ = collect_attention(loaded.model, loaded.task, "ROMEO")
    assert np.allclose(heads, maps[-1].weights.numpy(), atol=1e-4)
    is_one_line_error(client.post("/api/attention", json={"run": "lstm", "text": "ROMEO"}), 400, "no attention layers")
    limited = TestClient(create_app([roots["root"]], limits=Limits(max_attention_tokens=4)), raise_server_exceptions=False)
    is_one_line_error(limited.post("/api/attention", json={"run": "gpt", "text": "ROMEO"}), 400, "at most 4")


def test_one_generation_per_model_with_a_bounded_queue(roots):
    app = create_app([roots["root"]], limits=Limits(max_waiting=1, wait_seconds=0.2))
    client = TestClient(app, raise_server_exceptions=False)
    slot = app.state.index.slot("lstm")
    slot.loaded()
    slot.lock.acquire()  # a generation is running
    try:
        r = client.post("/api/next-token", json={"run": "lstm", "text": "RO"})
        is_one_line_error(r, 503, "busy for 0.2 s")
        events = read_events(client.post("/api/generate", json={"run": "lstm", "max_new_tokens": 3}))
        assert events == [("error", {"error": "this model was busy for 0.2 s; try again shortly"})]
        slot.waiting = 1  # another request already waits
        is_one_line_error(client.post("/api/next-token", json={"run": "lstm", "text": "RO"}), 503, "at most 1")
        is_one_line_error(client.post("/api/generate", json={"run": "lstm"}), 503, "at most 1")
        slot.waiting = 0
        assert app.state.index.slot("gpt-alias") is app.state.index.slot("gpt")  # one folder, one model
        other = client.post("/api/next-token", json={"run": "gpt", "text": "RO"})  # another model is free
        assert other.status_code == 200
    finally:
        slot.lock.release()
    assert client.post("/api/next-token", json={"run": "lstm", "text": "RO"}).status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` on a free port in a thread (also used by test_serve_browser.py)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_a_closed_stream_stops_its_generation(roots):
    import httpx

    app = create_app([roots["root"]])
    slot = app.state.index.slot("gpt")
    with Server(app) as server:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{server.url}/api/generate",
                             json={"run": "gpt", "prompt": "ROMEO:", "max_new_tokens": 1000, "seed": 0}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        break  # the first token: now close the connection (a closed tab)
            deadline = time.monotonic() + 15
            while slot.stats["cancelled"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert slot.stats["generations"] == 1 and slot.stats["cancelled"] == 1
            assert slot.lock.acquire(timeout=5)  # the slot is free again
            slot.lock.release()
            # And the model serves the next request.
            r = http.post(f"{server.url}/api/generate", json={"run": "gpt", "max_new_tokens": 5, "seed": 0})
            assert r.status_code == 200 and '"tokens": 5' in r.text


def test_a_closed_connection_stops_a_long_sampling(roots):
    import httpx

    app = create_app([roots["root"]])
    slot = app.state.index.slot("ddpm")
    slot.loaded()
    with Server(app) as server:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up (a closed tab) after 1 s
            httpx.post(f"{server.url}/api/sample", json={"run": "ddpm", "n": 64, "steps": 250}, timeout=1.0)
        t0 = time.monotonic()
        while slot.stats["samples_cancelled"] == 0 and time.monotonic() - t0 < 15:
            time.sleep(0.05)
        assert slot.stats["samples_cancelled"] == 1  # 64 images x 250 steps take far longer than this
        assert slot.lock.acquire(timeout=5)
        slot.lock.release()


# ---------------------------------------------------------------------------------------------
# Seq2seq and diffusion.


def test_translate_greedy_and_beam_match_the_model(client, roots):
    from duboko.train.run import load_run

    loaded = load_run(roots["root"] / "s2s", device="cpu")
    src = loaded.task.encode_source("1234")
    for beam in (1, 3):
        r = client.post("/api/translate", json={"run": "s2s", "text": "1234", "beam": beam})
        assert r.status_code == 200, r.text
        ids = loaded.model.greedy_decode(src)[0] if beam == 1 else loaded.model.beam_search(src, beam)[0]
        assert r.json()["output"] == loaded.task.tokenizer.decode(ids)
    is_one_line_error(client.post("/api/translate", json={"run": "s2s", "text": "12", "beam": 17}), 400, "1..16")
    is_one_line_error(client.post("/api/translate", json={"run": "s2s", "text": "12ab"}), 400, "vocabulary")
    is_one_line_error(client.post("/api/translate", json={"run": "gpt", "text": "12"}), 400, "seq2seq run")


def test_sample_grid_and_trajectory_frames(client, roots):
    import duboko

    r = client.post("/api/sample", json={"run": "ddpm", "label": 3, "n": 4, "steps": 6, "seed": 1,
                                         "guidance": 2.0, "frames": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 4 and body["steps"] == 6 and body["guidance"] == 2.0
    # 4 images of 28x28 in one row, 2 px padding, scaled 3x.
    assert png_size(body["grid"]) == (3 * (4 * 30 + 2), 3 * (30 + 2))
    assert len(body["frames"]) == 4 and body["frames"][-1]["t"] == -1 and body["frames"][0]["t"] > body["frames"][1]["t"]
    # The grid holds the library's samples (same seed, same condition).
    images = duboko.load(roots["root"] / "ddpm", device="cpu").sample(3, n=4, guidance=2.0, steps=6, seed=1, sampler="ddim")
    with Image.open(io.BytesIO(base64.b64decode(body["grid"].split(",", 1)[1]))) as grid:
        first = np.asarray(grid)[6:6 + 84:3, 6:6 + 84:3] / 255.0  # image 0, every 3rd pixel
    assert np.abs(first - images[0, 0].numpy()).max() < 1 / 255 + 1e-6
    balanced = client.post("/api/sample", json={"run": "ddpm", "n": 2, "steps": 2, "frames": 0})
    assert balanced.status_code == 200 and balanced.json()["frames"] == []


def test_sample_bad_inputs(client):
    cases = [
        ({"run": "ddpm", "n": 65}, "n must be an integer in 1..64"),
        ({"run": "ddpm", "n": 0}, "1..64"),
        ({"run": "ddpm", "steps": 251}, "steps must be an integer in 1..250"),
        ({"run": "ddpm", "frames": 21}, "frames must be an integer in 0..20"),
        ({"run": "ddpm", "guidance": 25}, "guidance must be a number in [0, 20]"),
        ({"run": "ddpm", "label": 10}, "label must be an integer in 0..9"),
        ({"run": "ddpm", "seed": -1}, "seed must be an integer"),
        ({"run": "gpt"}, "diffusion run"),
    ]
    for body, needle in cases:
        is_one_line_error(client.post("/api/sample", json=body), 400, needle)


def test_unknown_routes_and_methods_are_json(client):
    is_one_line_error(client.get("/api/nothing"), 404)
    is_one_line_error(client.get("/api/classify"), 405)


def test_an_unexpected_exception_is_one_line_500(roots, monkeypatch):
    from duboko.serve import app as serve_app

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(serve_app, "translate", broken)
    client = TestClient(create_app([roots["root"]]), raise_server_exceptions=False)
    err = is_one_line_error(client.post("/api/translate", json={"run": "s2s", "text": "12"}), 500, "RuntimeError: boom")
    assert "second line" not in err


# ---------------------------------------------------------------------------------------------
# The command.


def test_cli_without_fastapi_says_how_to_install(monkeypatch, capsys, tmp_path):
    import builtins

    from duboko.cli.main import main

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kwargs):
        if name in ("fastapi", "uvicorn"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e .[serve]" in err


def test_cli_warns_off_loopback_and_checks_roots(monkeypatch, capsys, tmp_path, roots):
    import uvicorn

    from duboko.cli.main import main
    from duboko.cli.serve import is_loopback

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", str(roots["root"])]) == 0
    out = capsys.readouterr()
    assert calls[-1] == {"host": "127.0.0.1", "port": 8765, "log_level": "warning"}
    assert "6 run(s)" in out.out and "http://localhost:8765" in out.out and "warning" not in out.err
    assert main(["serve", str(roots["root"]), "--host", "0.0.0.0", "--port", "9000"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 9000
    assert "reachable from other machines" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["serve", str(roots["root"]), "--port", "70000"]) == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and not is_loopback("0.0.0.0")


def test_classify_an_image_folder_run_with_its_own_decoding(tmp_path, monkeypatch):
    """A folder run's classes and decoding (`image_folder.decode_image`, no inversion): the same
    probabilities as `duboko predict` on the uploaded file."""
    from duboko.data.mnist import load_mnist
    from duboko.train.engine import Trainer
    from duboko.train.run import load_run

    monkeypatch.setenv("DUBOKO_CACHE", str(tmp_path / "cache"))
    x, y = load_mnist("test")
    for c, name in enumerate(("zero", "one")):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for i, image in enumerate(x[y == c][:8].numpy()):
            Image.fromarray(image).save(tmp_path / "pics" / name / f"{i}.png")
    fast = ["model.image_size=28", "data.image_size=28", "data.channels=1", "model.in_channels=1", "data.hflip=false",
            "data.crop_scale=1.0", "epochs=1", "max_steps=1", "batch_size=4", "train.num_threads=1", "train.report=false"]
    Trainer(C.resolve("image-folder", fast, data_dir=str(tmp_path / "pics")), tmp_path / "runs" / "folder").fit()
    upload = tmp_path / "upload.png"
    Image.fromarray(np.stack([x[0].numpy()] * 3, axis=-1)).resize((40, 30)).save(upload)  # RGB, not square
    url = "data:image/png;base64," + base64.b64encode(upload.read_bytes()).decode("ascii")
    client = TestClient(create_app([tmp_path / "runs"]), raise_server_exceptions=False)
    r = client.post("/api/classify", json={"run": "folder", "image": url})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input_size"] == [1, 28, 28] and body["inverted"] is False
    loaded = load_run(tmp_path / "runs" / "folder", device="cpu")
    ref = loaded.task.predict_files(loaded.model, [str(upload)], top=2)[0]["top"]
    assert [(row["class"], round(row["probability"], 5)) for row in body["top"]] == [(c, round(p, 5)) for c, p in ref]
