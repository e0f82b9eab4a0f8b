"""ONNX export: parity in ONNX Runtime against PyTorch for each exported family (max abs error
printed), the refusal when outputs differ, metadata, int8, `predict --engine onnxruntime`,
`bench inference`, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX export needs the [export] extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra (onnx, onnxscript, onnxruntime)")
import onnx  # noqa: E402

from duboko import config as C  # noqa: E402
from duboko.errors import DubokoError  # noqa: E402
from duboko.export import onnx as E  # noqa: E402
from duboko.train.engine import fit  # noqa: E402
from duboko.train.run import load_run  # noqa: E402

LM = ["epochs=1", "max_steps=2", "seq_len=16", "batch_size=4", "data.max_train_tokens=2000",
      "data.max_eval_tokens=200", "data.sample_tokens=0"]
IMAGES = ["epochs=1", "data.limit_train=128", "data.limit_test=64", "batch_size=64"]
RUNS = {
    "my_net": ("mnist-cnn", IMAGES + ["model.image_size=28", "data.image_size=28", "data.val_fraction=0"]),
    "mlp": ("mnist-mlp", IMAGES + ["hidden_sizes=[32]", "data.val_fraction=0"]),
    "gru": ("shakespeare-gru", LM + ["hidden_size=24"]),
    "lstm": ("shakespeare-lstm", LM + ["hidden_size=24", "num_layers=2"]),
    "rnn": ("shakespeare-rnn", LM + ["hidden_size=24"]),
    # 1 layer, not 2: with 2 the safetensors header is 0x0e80 bytes long, and io.load_tensors'
    # pickle sniffing (first byte 0x80) refuses the file (reported; io.py is not this module's).
    "gpt": ("shakespeare-gpt", LM + ["n_embd=32", "n_layer=1", "block_size=32"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for key, (recipe, sets) in RUNS.items():
        out[key] = root / key
        fit(C.resolve(recipe, sets), out[key], quiet=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNS))
def test_export_parity_per_family(runs, family, tmp_path):
    path = tmp_path / f"{family}.onnx"
    # The tanh RNN goes out as its equivalent GRU (torch 2.13 unrolls nn.RNN to a fixed length);
    # parity is measured against the RNN itself.
    report = E.export_run(runs[family], path)
    print(f"ONNX parity {family}: max abs error {report.max_abs_error:.2e} (tolerance {report.tolerance:g}) "
          f"over {len(report.checks)} checks")
    assert report.max_abs_error <= E.DEFAULT_TOLERANCE
    kinds = {(c["inputs"], c["batch"], c["seq_len"]) for c in report.checks}
    assert {k[0] for k in kinds} == {"random", "real"} and len({k[1] for k in kinds}) == 2
    if family not in ("my_net", "mlp"):
        assert len({k[2] for k in kinds}) == 2  # two sequence lengths
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["recipe"])["recipe"] == RUNS[family][0]
    assert float(meta["parity_max_abs_error"]) == pytest.approx(report.max_abs_error, rel=1e-2)
    if family in ("my_net", "mlp"):
        assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
        assert json.loads(meta["preprocessing"])["image_size"] == 28
    else:
        assert json.loads(meta["tokenizer"])["kind"] == "char"
    # The file runs on its own, at a batch size and length the parity check did not use.
    sess = E.session(path)
    names = [i.name for i in sess.get_inputs()]
    if family in ("my_net", "mlp"):
        chans = json.loads(meta["preprocessing"])["channels"]
        y = sess.run(None, {"images": torch.randn(3, chans, 28, 28).numpy()})[0]
        assert y.shape == (3, 10)
    else:
        feed = {"tokens": torch.randint(0, 10, (3, 11)).numpy()}
        for name in names[1:]:
            shape = [d if isinstance(d, int) else 3 for d in sess.get_inputs()[names.index(name)].shape]
            feed[name] = torch.zeros(shape).numpy()
        assert sess.run(None, feed)[0].shape[:2] == (3, 11)


def test_tanh_rnn_as_gru_is_the_same_function():
    """The GRU rewrite of a tanh RNN (saturated gates) against nn.RNN in PyTorch: 2 layers,
    random weights and state, two lengths; equal to float32 rounding."""
    torch.manual_seed(0)
    rnn = torch.nn.RNN(7, 12, num_layers=2, batch_first=True).eval()
    gru = E.tanh_rnn_as_gru(rnn).eval()
    for t in (1, 13):
        x, h0 = torch.randn(3, t, 7), torch.randn(2, 3, 12)
        (y_r, h_r), (y_g, h_g) = rnn(x, h0), gru(x, h0)
        assert (y_r - y_g).abs().max() < 1e-6 and (h_r - h_g).abs().max() < 1e-6
    with pytest.raises(DubokoError, match="relu RNN"):
        E.tanh_rnn_as_gru(torch.nn.RNN(3, 4, nonlinearity="relu"))


def test_parity_failure_writes_nothing(runs, tmp_path, monkeypatch):
    """A graph that computes something else (here: PyTorch's reference is nudged by 1e-3) is refused."""
    path = tmp_path / "bad.onnx"
    real_parity = E.parity

    def skewed(spec, sess):
        rows = real_parity(spec, sess)
        rows[-1]["max_abs_error"] = 1e-3  # what a wrong gate order or a lost bias looks like, only larger
        return rows

    monkeypatch.setattr(E, "parity", skewed)
    with pytest.raises(DubokoError, match=r"max abs error 0.001 > tolerance 0.0001 .*nothing written"):
        E.export_run(runs["my_net"], path)
    assert not path.exists()


def test_parity_catches_a_real_mismatch(runs, tmp_path):
    """No monkeypatching of the check: the ONNX graph of one model against another model's outputs."""
    from duboko.train.run import load_run

    loaded = load_run(runs["gru"], device="cpu", setup_task=False)
    E.setup_for_export(loaded)
    spec = E.graph_spec(loaded)
    program = E._quiet_export(spec, spec.make_inputs(2, 17, False), 18)
    sess = E.session(program.model_proto.SerializeToString())
    assert max(r["max_abs_error"] for r in E.parity(spec, sess)) < 1e-5
    with torch.no_grad():
        loaded.model.rnn.bias_hh_l0[:24].add_(0.5)  # the reset-gate bias: the GRU converter's classic slip
    worst = max(r["max_abs_error"] for r in E.parity(spec, sess))
    print(f"GRU with a changed reset-gate bias: max abs error {worst:.3g}")
    assert worst > 1e-2


@pytest.mark.slow
def test_int8_export_and_bench_inference(runs, tmp_path):
    from duboko.bench.inference import format_report, run_inference_bench

    path = tmp_path / "int8.onnx"
    report = E.export_run(runs["my_net"], path, quantize="int8")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["precision"] == "int8" and 0.0 <= report.int8_agreement <= 1.0
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in onnx.load(str(path)).graph.node)
    result = run_inference_bench(runs["my_net"], repeats=3, warmup=1)
    print(format_report(result))
    engines = result["engines"]
    assert set(engines) == {"eager_fp32", "ort_fp32", "ort_int8"}
    for row in engines.values():
        assert row["latency_ms_median"] > 0 and row["latency_ms_p95"] >= row["latency_ms_median"]
        assert row["throughput"] > 0 and 0.0 <= row["test_accuracy"] <= 1.0
    assert engines["ort_fp32"]["test_accuracy"] == engines["eager_fp32"]["test_accuracy"]


def _digit_png(tmp_path: Path) -> Path:
    from PIL import Image

    from duboko.data import mnist

    images, _ = mnist.load_split("test", None, limit=1)
    path = tmp_path / "digit.png"
    Image.fromarray(images[0].numpy()).save(path)
    return path


def _duboko(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "duboko", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_export_then_predict_with_onnxruntime_matches_torch(runs, tmp_path):
    run = runs["my_net"]
    onnx_path = tmp_path / "cnn.onnx"
    out = _duboko("export", str(run), "--format", "onnx", "--out", str(onnx_path))
    assert out.returncode == 0, out.stderr
    assert "max abs error" in out.stdout and onnx_path.exists()
    png = str(_digit_png(tmp_path))
    eager = _duboko("predict", str(run), png, "--json")
    ort = _duboko("predict", str(run), png, "--json", "--engine", "onnxruntime", "--onnx", str(onnx_path))
    assert eager.returncode == 0 and ort.returncode == 0, ort.stderr
    a, b = json.loads(eager.stdout)["predictions"][0], json.loads(ort.stdout)["predictions"][0]
    assert a["class"] == b["class"]
    for (ca, pa), (cb, pb) in zip(a["top"], b["top"]):
        assert ca == cb and abs(pa - pb) < 1e-5


def test_onnx_file_of_another_run_is_refused(runs, tmp_path):
    path = tmp_path / "mlp.onnx"
    E.export_run(runs["mlp"], path)
    out = _duboko("predict", str(runs["my_net"]), str(_digit_png(tmp_path)), "--engine", "onnxruntime", "--onnx", str(path))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "was not exported from the weights" in out.stderr


def test_bad_opset_and_unsupported_task_are_one_line(runs, tmp_path):
    out = _duboko("export", str(runs["mlp"]), "--opset", "11", "--out", str(tmp_path / "x.onnx"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "opset 11 cannot be exported" in out.stderr
    with pytest.raises(DubokoError, match="float32 weights"):
        from duboko.train.run import load_run

        loaded = load_run(runs["mlp"], device="cpu", setup_task=False)
        loaded.model.half()
        E.export_loaded(loaded, tmp_path / "half.onnx")
    assert not (tmp_path / "half.onnx").exists()


@pytest.mark.slow
def test_unet_denoiser_step_export_parity(tmp_path):
    """The diffusion denoiser step ε_θ(x_t, t, label) of a class-conditioned UNet: parity in ONNX
    Runtime on random and real noisy digits at two batch sizes. The weights are perturbed first:
    a freshly trained tiny UNet still has its zero-initialised output convolution (ADM), whose
    output is 0 whatever the graph, which would make parity trivial."""
    tiny = ["model.base_channels=8", "model.channel_mults=[1, 2]", "model.groups=4", "model.num_heads=2",
            "model.attention_resolutions=[7]", "data.limit_train=64", "data.val_size=16", "data.eval_samples=0",
            "data.grid_rows=0", "data.fd_reference=300", "data.eval_batch_size=10", "train.epochs=1",
            "train.batch_size=16", "train.num_threads=1", "train.report=false"]
    run = tmp_path / "ddpm"
    fit(C.resolve("mnist-diffusion-class", tiny), run, quiet=True)
    loaded, report = _export_perturbed(run, tmp_path / "unet.onnx")
    print(f"ONNX parity unet-denoiser: max abs error {report.max_abs_error:.2e} over {len(report.checks)} checks")
    assert report.max_abs_error <= E.DEFAULT_TOLERANCE
    assert {c["inputs"] for c in report.checks} == {"random", "real"}
    sess = E.session(tmp_path / "unet.onnx")
    assert [i.name for i in sess.get_inputs()] == ["x", "timesteps", "labels"]
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999]), torch.tensor([1, 10, 4])
    got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "timesteps": t.numpy(), "labels": y.numpy()})[0])
    with torch.no_grad():
        expected = loaded.model(x, t, y)
    assert expected.abs().max() > 0.1  # a real signal, not the zero output
    assert (got - expected).abs().max() <= E.DEFAULT_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Two-graph families: seq2seq (encoder + decoder step) and text-to-image (text encoder + denoiser).

# 64 steps on numbers below 10,000: enough that greedy outputs differ per source and end in EOS
# (e.g. "two hundred--", "nine"), a few seconds on 2 cores.
SEQ2SEQ = ["train_size=1024", "val_size=20", "test_size=20", "epochs=4", "batch_size=64", "eval_every=20", "lr=3e-3",
           "warmup_steps=10", "d_model=32", "dim_feedforward=64", "num_heads=4", "num_encoder_layers=1",
           "num_decoder_layers=2", "max_number=9999", "train.num_threads=1"]
TEXT2IMG = ["model.base_channels=8", "model.channel_mults=[1, 2]", "model.groups=4", "model.num_heads=2",
            "model.attention_resolutions=[7]", "model.cross_attention_resolutions=[7]", "model.text_dim=16",
            "model.text_layers=1", "model.text_heads=2", "data.limit_train=64", "data.val_size=16",
            "data.eval_samples=0", "data.grid_rows=0", "data.eval_batch_size=16", "train.epochs=1",
            "train.batch_size=16", "train.num_threads=1", "train.report=false"]


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _assert_parity_grid(checks: list[dict], graph: str) -> float:
    """Random and real inputs, two batch sizes, two lengths; returns the worst error."""
    rows = [c for c in checks if c.get("graph") == graph]
    assert {(c["inputs"], c["batch"], c["seq_len"]) for c in rows} == {
        (kind, b, t) for kind in ("random", "real") for b in {c["batch"] for c in rows} for t in {c["seq_len"] for c in rows}}
    assert len({c["batch"] for c in rows}) == 2 and len({c["seq_len"] for c in rows}) == 2
    worst = max(c["max_abs_error"] for c in rows)
    assert worst <= E.DEFAULT_TOLERANCE
    return worst


def _export_perturbed(run: Path, out: Path):
    """Load a tiny trained run, perturb its weights (a tiny run still has its zero-initialised
    output convolution, which would make parity trivial) and export it; (loaded, report)."""
    loaded = load_run(run, device="cpu", setup_task=False)
    E.setup_for_export(loaded)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return loaded, E.export_loaded(loaded, out)


def test_graph_path_naming():
    assert E.graph_path("runs/x/model.onnx", "") == Path("runs/x/model.onnx")
    assert E.graph_path("runs/x/model.onnx", "encoder") == Path("runs/x/model.encoder.onnx")
    assert E.graph_path("nums", "decoder_step") == Path("nums.decoder_step.onnx")


@pytest.mark.slow
def test_seq2seq_export_greedy_decoding_in_onnxruntime_equals_torch(tmp_path, capsys):
    """`duboko export` on a seq2seq run writes the encoder and the decoder step; from the two
    files alone (their metadata: tokenizer, special ids, sizes) greedy decoding in ONNX Runtime
    gives PyTorch's tokens on every held-out source at batch 20, and on 5 of them one by one."""
    import onnxruntime as ort

    from duboko.cli.main import main

    run = tmp_path / "s2s"
    fit(C.resolve("numbers-seq2seq", SEQ2SEQ), run, quiet=True)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "nums.onnx")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    enc_path, dec_path = tmp_path / "nums.encoder.onnx", tmp_path / "nums.decoder_step.onnx"
    assert lines[0].startswith(f"wrote {enc_path} ") and lines[1].startswith(f"wrote {dec_path} ")
    assert "max abs error" in lines[0] and lines[2].startswith("checked: greedy decoding") and len(lines) == 3
    enc_meta, dec_meta = _meta(enc_path), _meta(dec_path)
    for graph, meta in (("encoder", enc_meta), ("decoder_step", dec_meta)):
        worst = _assert_parity_grid(json.loads(meta["parity_checks"]), graph)
        print(f"ONNX parity seq2seq {graph}: max abs error {worst:.2e} (tolerance {E.DEFAULT_TOLERANCE:g})")
        assert json.loads(meta["recipe"])["recipe"] == "numbers-seq2seq" and meta["graph"] == graph
        assert json.loads(meta["graphs"]) == {"encoder": enc_path.name, "decoder_step": dec_path.name}
        assert json.loads(meta["special_ids"]) == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
        assert int(meta["max_len"]) == 64
    loaded = load_run(run, device="cpu")
    tok = loaded.task.tokenizer
    assert json.loads(enc_meta["tokenizer"])["pieces"] == tok.pieces
    assert all(r["identical"] == r["sequences"] for r in json.loads(dec_meta["pipeline_checks"]))

    enc, dec = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (enc_path, dec_path))
    decoding = json.loads(dec.get_modelmeta().custom_metadata_map["decoding"])
    loaded.task._ensure_data()
    sources = [s for s, _ in loaded.task.encoded["test"]]
    src = torch.zeros(len(sources), max(map(len, sources)), dtype=torch.long)  # right-padded with pad (0)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(s)
    expected = loaded.model.greedy_decode(src)
    got = E.greedy_decode_onnx(enc, dec, src, decoding)
    singles = [E.greedy_decode_onnx(enc, dec, src[i : i + 1, : len(s)], decoding)[0] for i, s in enumerate(sources[:5])]
    print(f"seq2seq greedy decoding: ONNX Runtime == PyTorch for {sum(e == g for e, g in zip(expected, got))} of "
          f"{len(sources)} held-out sources (batch {len(sources)}), e.g. {tok.decode(got[0])!r}")
    assert got == expected and singles == expected[:5]  # batch 20, and unpadded one by one
    assert len({tuple(e) for e in expected}) > 2  # the outputs differ per source: not a constant
    assert any(len(e) < 63 for e in expected)  # some stop at EOS before max_len

    # The loop check catches a real mismatch: PyTorch with one changed weight against these graphs.
    specs = E.export_plan(loaded).specs
    with torch.no_grad():
        loaded.model.head.weight[4:].add_(0.5 * torch.randn_like(loaded.model.head.weight[4:]))
    with pytest.raises(DubokoError, match="greedy decoding differs .* nothing written"):
        E._seq2seq_greedy_check(loaded, specs, {"encoder": enc, "decoder_step": dec}, E.DEFAULT_TOLERANCE)


def test_two_graph_families_refuse_int8_and_bench_in_one_line(tmp_path):
    run = tmp_path / "s2s"
    fit(C.resolve("numbers-seq2seq", SEQ2SEQ[:4] + ["epochs=1", "max_steps=1", "d_model=16", "dim_feedforward=32",
                                                     "num_encoder_layers=1", "num_decoder_layers=1", "max_number=9999"]),
        run, quiet=True)
    out = _duboko("export", str(run), "--quantize", "int8", "--out", str(tmp_path / "q.onnx"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--quantize int8 covers single-graph families" in out.stderr
    assert not list(tmp_path.glob("q*.onnx"))
    loaded = load_run(run, device="cpu")
    with pytest.raises(DubokoError, match="exports 2 graphs \\(encoder, decoder_step\\)"):
        E.graph_spec(loaded)


def _onnx_only_text_to_image(enc_path: Path, den_path: Path, prompts: list[str], steps: int, guidance: float,
                             x_T: torch.Tensor):
    """Guided DDIM (eta 0) from the two exported files and their metadata only: numpy and
    ONNX Runtime, no duboko, no PyTorch model (what an app in another language would do)."""
    import numpy as np
    import onnxruntime as ort

    enc, den = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (enc_path, den_path))
    meta = den.get_modelmeta().custom_metadata_map
    tok, schedule = json.loads(meta["tokenizer"]), json.loads(meta["schedule"])
    assert schedule["prediction_type"] == "epsilon" and schedule["timestep_spacing"] == "leading"
    ids = {ch: i + 2 for i, ch in enumerate(tok["alphabet"])}  # pad 0, BOS 1, then the alphabet
    rows = [[tok["bos"]] + [ids[ch] for ch in " ".join(p.lower().split())] for p in prompts]
    rows += [json.loads(meta["null_prompt"])] * len(prompts)  # [prompts; null prompts] for guidance
    tokens = np.zeros((len(rows), max(map(len, rows))), dtype=np.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    context, mask = enc.run(None, {"tokens": tokens})
    abar = np.asarray(schedule["alphas_cumprod"], dtype=np.float32)
    ratio = schedule["num_train_timesteps"] // steps
    x = x_T.numpy()
    for t in (np.arange(steps) * ratio)[::-1]:
        out = den.run(None, {"x": np.concatenate([x, x]), "timesteps": np.full(2 * len(x), t, dtype=np.int64),
                             "context": context, "context_mask": mask})[0]
        cond, uncond = out[: len(x)], out[len(x):]
        eps = uncond + guidance * (cond - uncond)
        a, a_prev = abar[t], (abar[t - ratio] if t - ratio >= 0 else np.float32(1.0))
        x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)  # from the clipped x̂_0 (use_clipped_model_output)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps  # DDIM eq. 12, eta = 0
    return torch.from_numpy(np.clip(x, -1, 1))


@pytest.mark.slow
def test_text_to_image_export_parity_and_an_onnx_only_ddim_run(tmp_path):
    """The text-conditioned UNet exports as the prompt encoder and the denoiser step; parity at two
    batch sizes and two prompt lengths; a 5-step guided DDIM text-to-image run from the files alone
    (numpy + ONNX Runtime) gives the PyTorch pipeline's images within 1e-3. The weights are
    perturbed first: a tiny run still has its zero-initialised output convolution (see above)."""
    from duboko.seeding import generator

    run = tmp_path / "t2i"
    fit(C.resolve("mnist-text2img", TEXT2IMG), run, quiet=True)
    loaded, report = _export_perturbed(run, tmp_path / "t2i.onnx")
    enc_path, den_path = tmp_path / "t2i.text_encoder.onnx", tmp_path / "t2i.denoiser.onnx"
    assert [f.path for f in report.files] == [enc_path, den_path]
    for graph in ("text_encoder", "denoiser"):
        worst = _assert_parity_grid(report.checks, graph)
        print(f"ONNX parity text-to-image {graph}: max abs error {worst:.2e} (tolerance {E.DEFAULT_TOLERANCE:g})")
    ddim = report.pipeline_checks
    print("export's DDIM check, images max abs error: " + ", ".join(f"batch {r['batch']} {r['max_abs_error']:.2e}" for r in ddim))
    assert {r["batch"] for r in ddim} == set(E.PARITY_BATCHES)
    meta = _meta(den_path)
    assert json.loads(meta["tokenizer"])["kind"] == "duboko-prompt-char" and meta["graph"] == "denoiser"
    assert len(json.loads(meta["schedule"])["alphas_cumprod"]) == 1000
    assert json.loads(_meta(enc_path)["graphs"]) == {"text_encoder": enc_path.name, "denoiser": den_path.name}

    prompts, steps, guidance, seed = ["a handwritten digit seven", "the number 3", "two"], 5, 3.0, 11
    torch_images = loaded.task.generate(loaded.model, len(prompts), prompts=prompts, sampler="ddim", steps=steps,
                                        guidance=guidance, eta=0.0, seed=seed).images
    x_T = torch.randn((len(prompts), 1, 28, 28), generator=generator(seed))  # the pipeline's first draw
    onnx_images = _onnx_only_text_to_image(enc_path, den_path, prompts, steps, guidance, x_T)
    err = float((onnx_images - torch_images).abs().max())
    print(f"text-to-image DDIM ({steps} steps, guidance {guidance}) from the ONNX files alone vs the PyTorch "
          f"pipeline: max abs error {err:.2e}")
    assert torch_images.std() > 0.1  # real images, not a constant
    assert err <= 1e-3
