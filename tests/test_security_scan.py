"""`duboko scan`: a corpus of malicious model files built here (crafted opcode by opcode or with
`__reduce__` classes, dumped, never loaded) is all flagged; benign files written by torch.save,
numpy and safetensors are all clean; fuzzed headers never crash the scanner."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import tarfile
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duboko.cli.main import main
from duboko.security import scan as S

# -- building blocks (dumped, never loaded) -----------------------------------------------------


class Reduce:
    """pickle.dumps(Reduce(f, args)) writes a pickle that calls f(*args) when loaded."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def sbu(text: str) -> bytes:
    """SHORT_BINUNICODE"""
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def proto4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def torch_zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_bad_crc(zip_bytes: bytes) -> bytes:
    """Flip the stored CRC-32 of every member (local and central headers)."""
    data = bytearray(zip_bytes)
    for sig, off in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        at = data.find(sig)
        while at >= 0:
            data[at + off] ^= 0xFF
            at = data.find(sig, at + 4)
    return bytes(data)


SYSTEM = pickle.dumps(Reduce(os.system, ("echo pwned",)), protocol=2)
# getattr(__import__("os"), "system")("id"), protocol 0 by hand
GETATTR_CHAIN = (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'id'\ntR.")
# STACK_GLOBAL whose strings come back through the memo (MEMOIZE then BINGET): picklescan's bypass
MEMO_STACK_GLOBAL = proto4(sbu("os") + b"\x94" + sbu("system") + b"\x94" + b"00" + b"h\x00h\x01\x93"
                           + sbu("id") + b"\x85R")
LONG_MEMO_STACK_GLOBAL = proto4(sbu("subprocess") + b"r\x10\x00\x00\x00" + b"0" + sbu("check_output") + b"r\x11\x00\x00\x00"
                                + b"0" + b"j\x10\x00\x00\x00j\x11\x00\x00\x00\x93" + b"]" + sbu("id") + b"a\x85R")
DUP_STACK_GLOBAL = proto4(sbu("builtins") + sbu("exec") + b"2" + b"0" + b"\x93" + sbu("print(1)") + b"\x85R")


def malicious_corpus(tmp: Path) -> dict[str, Path]:
    files: dict[str, bytes] = {}
    for proto in range(6):
        files[f"system_p{proto}.pkl"] = pickle.dumps(Reduce(os.system, ("echo pwned",)), protocol=proto)
        files[f"eval_p{proto}.bin"] = pickle.dumps(Reduce(eval, ("1+1",)), protocol=proto)
    files["posix_global.pkl"] = b"cposix\nsystem\n(S'id'\ntR."
    files["exec.pkl"] = pickle.dumps(Reduce(exec, ("import os",)), protocol=4)
    files["getattr_chain.pkl"] = GETATTR_CHAIN
    files["subprocess.pkl"] = pickle.dumps(Reduce(subprocess.check_output, (["id"],)), protocol=3)
    files["runpy.pkl"] = b"crunpy\n_run_code\n(S'import os'\n}tR."
    files["pip_main.pkl"] = proto4(sbu("pip") + sbu("main") + b"\x93" + b"]" + sbu("install") + b"a\x85R")
    files["pip_internal.pkl"] = b"cpip._internal\nmain\n(]tR."
    files["memo_stack_global.pkl"] = MEMO_STACK_GLOBAL
    files["long_memo_stack_global.pkl"] = LONG_MEMO_STACK_GLOBAL
    files["dup_stack_global.pkl"] = DUP_STACK_GLOBAL
    files["dotted_name.pkl"] = proto4(sbu("torch") + sbu("serialization.os.system") + b"\x93" + sbu("id") + b"\x85R")
    files["unresolved_stack_global.pkl"] = proto4(sbu("collections") + sbu("OrderedDict") + b"\x93)R" + sbu("x") + b"\x93")
    # picklescan issue 14: BINPUT and MEMOIZE mixed, so that a scanner counting only MEMOIZE reads
    # memo[0] as "torch._utils" while the unpickler has "os" there
    files["memo_confusion.pkl"] = proto4(b"X\x02\x00\x00\x00osq\x00" + b"X\x06\x00\x00\x00systemq\x01" + b"00"
                                         + sbu("torch._utils") + b"\x94" + sbu("_rebuild_tensor_v2") + b"\x94" + b"00"
                                         + b"h\x00h\x01\x93" + sbu("id") + b"\x85R")
    # modelscan issue 85: attributes set by BUILD on an allowed function, read back as dotted names,
    # then passed through the memo into STACK_GLOBAL
    files["build_setattr.pkl"] = (b"\x80\x05cnumpy\nprod\nN(Va\nVos\nd\x86bN(Vb\nVsystem\nd\x86b0"
                                  b"cnumpy\nprod.a\np0\ncnumpy\nprod.b\np1\n00g0\ng1\n\x93Vecho\n\x85R.")
    files["inst.pkl"] = b"(S'id'\nios\nsystem\n."
    files["obj.pkl"] = b"(cos\nsystem\nS'id'\no."
    files["newobj.pkl"] = b"\x80\x02csubprocess\nPopen\n]X\x02\x00\x00\x00ida\x85\x81."
    files["ext1.pkl"] = b"\x80\x02\x82\x01)R."
    files["shutil.pkl"] = b"cshutil\nrmtree\n(S'/'\ntR."
    files["webbrowser.pkl"] = b"cwebbrowser\nopen\n(S'http://x'\ntR."
    files["importlib.pkl"] = b"cimportlib\nimport_module\n(S'os'\ntR."
    files["two_pickles.pkl"] = pickle.dumps({"ok": 1}, protocol=2) + SYSTEM  # the second load runs it
    files["truncated.pkl"] = SYSTEM[:-5]  # unparseable
    # torch checkpoints
    buf = io.BytesIO()
    torch.save(Reduce(os.system, ("echo pwned",)), buf)
    files["torch_save_reduce.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(Reduce(os.system, ("echo pwned",)), buf, _use_new_zipfile_serialization=False)
    files["torch_legacy_reduce.pt"] = buf.getvalue()
    files["zip_data_pkl.pt"] = torch_zip({"archive/data.pkl": SYSTEM, "archive/version": b"3\n"})
    files["zip_renamed.ckpt"] = torch_zip({"model/weights.bin": SYSTEM, "model/version": b"3\n"})
    files["zip_two_pickles.pt"] = torch_zip({"archive/data.pkl": pickle.dumps({"w": 1}, protocol=2),
                                             "archive/extra.pkl": MEMO_STACK_GLOBAL}, zipfile.ZIP_DEFLATED)
    files["zip_bad_crc.pt"] = with_bad_crc(torch_zip({"archive/data.pkl": SYSTEM}))
    inner = torch_zip({"archive/data.pkl": GETATTR_CHAIN})
    files["nested.zip"] = torch_zip({"outer/model.pt": inner})
    files["nested2.zip"] = torch_zip({"a.zip": torch_zip({"b.zip": inner})})
    # legacy tar checkpoints
    for name, member in (("pickle", SYSTEM), ("storages", b"\x00" * 16 + SYSTEM + b"\x01" * 16)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for n, data in (("sys_info", pickle.dumps({"protocol_version": 1000}, protocol=2)),
                            ("pickle", pickle.dumps({"w": 1}, protocol=2)), ("storages", b"\x80\x02K\x00."),
                            ("tensors", b"\x80\x02K\x00."), (name, member)):
                if n == name and data is not member:
                    continue
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        files[f"legacy_tar_{name}.tar"] = buf.getvalue()
    # compressed pickles (joblib's .pkl.gz / .bz2 / .xz)
    import bz2
    import gzip
    import lzma

    files["joblib_style.pkl.gz"] = gzip.compress(SYSTEM)
    files["compressed.bz2"] = bz2.compress(MEMO_STACK_GLOBAL)
    files["compressed.xz"] = lzma.compress(GETATTR_CHAIN)
    # NumPy object arrays
    arr = np.array([Reduce(os.system, ("echo pwned",)), 1], dtype=object)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    files["object.npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, ok=np.arange(3), bad=arr)
    files["object.npz"] = buf.getvalue()
    paths = {}
    for name, data in files.items():
        path = tmp / "bad" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        paths[name] = path
    return paths


def benign_corpus(tmp: Path) -> dict[str, Path]:
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file

    out = tmp / "good"
    out.mkdir()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()
    paths = {}

    def put(name):
        paths[name] = out / name
        return paths[name]

    torch.save(model.state_dict(), put("state_dict.pt"))
    torch.save(opt.state_dict(), put("adam_state.pth"))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "names": ["a", "b"]}, put("checkpoint.ckpt"))
    torch.save(model.state_dict(), put("legacy.pt"), _use_new_zipfile_serialization=False)
    torch.save({"bf16": torch.ones(3, dtype=torch.bfloat16), "i": torch.arange(4), "b": torch.zeros(2, dtype=torch.bool)},
               put("dtypes.pt"))
    torch.save(torch.nn.Parameter(torch.randn(2, 2)), put("parameter.pt"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, put("model.safetensors"), metadata={"format": "pt"})
    save_file({"empty": torch.zeros(0), "half": torch.ones(2, 3, dtype=torch.float16)}, put("edge.safetensors"))
    save_np({"x": np.arange(6, dtype=np.int32).reshape(2, 3)}, str(put("np.safetensors")))
    np.save(put("plain.npy"), np.random.default_rng(0).normal(size=(4, 5)))
    np.savez(put("plain.npz"), a=np.arange(3), b=np.ones((2, 2), dtype=np.float32))
    np.savez_compressed(put("compressed.npz"), a=np.arange(30))
    put("plain.pkl").write_bytes(pickle.dumps({"lr": 0.1, "sizes": [1, 2], "name": "x", "t": (1, 2.5)}, protocol=2))
    put("ordered.pkl").write_bytes(pickle.dumps(OrderedDict(a=1, b={1, 2}, c=b"bytes"), protocol=0))
    import gzip

    put("plain.pkl.gz").write_bytes(gzip.compress(pickle.dumps({"a": [1.0, 2.0]}, protocol=4)))
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scan")
    return tmp, malicious_corpus(tmp), benign_corpus(tmp)


# -- the corpus -------------------------------------------------------------------------------

def test_every_malicious_file_is_flagged(corpus):
    _, bad, _ = corpus
    assert len(bad) >= 30
    missed = {}
    for name, path in bad.items():
        report = S.scan_file(path)
        if report.status not in ("dangerous", "unparseable"):
            missed[name] = (report.status, [f.what for f in report.findings])
    assert not missed


def test_every_benign_file_is_clean(corpus):
    _, _, good = corpus
    assert len(good) >= 10
    flagged = {n: [f.what for f in S.scan_file(p).findings] for n, p in good.items() if S.scan_file(p).status != "clean"}
    assert not flagged


def test_torch_checkpoints_list_their_rebuild_globals(corpus):
    _, _, good = corpus
    report = S.scan_file(good["state_dict.pt"])
    assert report.format == "torch-zip"
    names = {(g.module, g.name) for g in report.globals}
    assert ("torch._utils", "_rebuild_tensor_v2") in names and ("collections", "OrderedDict") in names
    assert all(g.level == "safe" for g in report.globals)
    legacy = S.scan_file(good["legacy.pt"])
    assert legacy.format == "torch-legacy" and legacy.pickles == 5 and legacy.status == "clean"


@pytest.mark.parametrize("name, module, attr", [
    ("memo_stack_global.pkl", "os", "system"),
    ("long_memo_stack_global.pkl", "subprocess", "check_output"),
    ("dup_stack_global.pkl", "builtins", "exec"),
    ("pip_main.pkl", "pip", "main"),
    ("getattr_chain.pkl", "builtins", "getattr"),
    ("zip_renamed.ckpt", "posix", "system"),
    ("nested2.zip", "builtins", "__import__"),
    ("zip_bad_crc.pt", "posix", "system"),
    ("object.npz", "posix", "system"),
    ("legacy_tar_storages.tar", "posix", "system"),
    ("memo_confusion.pkl", "os", "system"),
    ("build_setattr.pkl", "numpy", "prod.a"),
])
def test_the_global_behind_each_bypass_is_named(corpus, name, module, attr):
    _, bad, _ = corpus
    report = S.scan_file(bad[name])
    dangerous = {(g.module, g.name) for g in report.globals if g.level == "dangerous"}
    assert (module, attr) in dangerous, [f.what for f in report.findings]


def test_calls_are_marked(corpus):
    _, bad, _ = corpus
    report = S.scan_file(bad["system_p2.pkl"])
    (ref,) = [g for g in report.globals if g.name == "system"]
    assert ref.called and any(f.what.startswith("calls ") for f in report.findings)


def test_bad_crc_is_reported_and_still_read(corpus):
    _, bad, _ = corpus
    report = S.scan_file(bad["zip_bad_crc.pt"])
    assert report.status == "unparseable"
    assert any("CRC" in f.what for f in report.findings)
    assert any(g.name == "system" for g in report.globals)


def test_the_scanner_never_runs_or_imports_anything(corpus, monkeypatch):
    _, bad, _ = corpus
    ran = []
    monkeypatch.setattr(os, "system", lambda *a: ran.append(a))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: ran.append(a))
    import sys

    before = set(sys.modules)
    for path in bad.values():
        S.scan_file(path)
    assert not ran
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("webbrowser", "runpy", "pip", "shutil")}


def test_classify():
    assert S.classify("torch._utils", "_rebuild_tensor_v2") == "safe"
    assert S.classify("os", "system") == "dangerous"
    assert S.classify("os.path", "join") == "dangerous"
    assert S.classify("builtins", "getattr") == "dangerous"
    assert S.classify("builtins", "set") == "safe"
    assert S.classify("torch", "serialization.os.system") == "dangerous"
    assert S.classify("torch", "__class__") == "dangerous"
    assert S.classify("mylib.layers", "Dense") == "suspicious"


def test_nesting_is_bounded(tmp_path):
    data = torch_zip({"archive/data.pkl": SYSTEM})
    for i in range(S.MAX_DEPTH + 2):
        data = torch_zip({f"level{i}.zip": data})
    path = tmp_path / "deep.zip"
    path.write_bytes(data)
    report = S.scan_file(path)
    assert report.status == "unparseable" and any("nested deeper" in f.what for f in report.findings)


# -- safetensors headers ----------------------------------------------------------------------

def st_file(tmp_path: Path, header: dict | bytes, data: bytes, name="x.safetensors") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, problem", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "bytes for shape"),
    ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4, "gap"),
    ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 4, "not covered"),
    ({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}}, b"\0" * 2, "not a list of sizes"),
    ({"a": {"dtype": "U8", "shape": [2]}}, b"\0" * 2, "entry is not"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": 2}', b"\0", "duplicate key"),
    (b"{" + b"[" * 100_000, b"", "JSON"),
])
def test_safetensors_header_checks(tmp_path, header, data, problem):
    report = S.scan_file(st_file(tmp_path, header, data))
    assert report.format == "safetensors"
    if problem is None:
        assert report.status == "clean", report.findings
    else:
        assert report.status == "unparseable"
        assert any(problem in f.what for f in report.findings), report.findings


def test_safetensors_header_length_is_bounded(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    report = S.scan_file(path)
    # An 8-byte length past the end is not taken for safetensors: whatever format, it is flagged.
    assert report.status == "unparseable"


# -- fuzzing: only reports, never exceptions --------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, derandomize=False, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(min_size=0, max_size=300))
def test_fuzzed_pickles_never_crash(tmp_path, blob):
    path = tmp_path / "f.pkl"
    path.write_bytes(b"\x80\x04" + blob)
    assert S.scan_file(path).status in S.LEVELS


@FUZZ
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                    max_leaves=20),
       st.binary(max_size=64))
def test_fuzzed_safetensors_headers_never_crash(tmp_path, header, data):
    raw = json.dumps(header).encode()
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    assert S.scan_file(path).status in S.LEVELS


@FUZZ
@given(st.dictionaries(st.text(max_size=5), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "U8", "BF16", "I64", "X"]),
    "shape": st.lists(st.integers(-2, 5), max_size=3),
    "data_offsets": st.lists(st.integers(-4, 40), min_size=2, max_size=2)}), max_size=4),
    st.integers(0, 64))
def test_fuzzed_tensor_entries_never_crash(tmp_path, header, size):
    path = st_file(tmp_path, header, b"\0" * size)
    assert S.scan_file(path).status in S.LEVELS


@FUZZ
@given(st.data())
def test_mutated_checkpoints_never_crash(tmp_path, data):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    blob = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(blob[:cut]))
    assert S.scan_file(path).status in S.LEVELS


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 3))
def test_fuzzed_npy_headers_never_crash(tmp_path, blob, version):
    path = tmp_path / "f.npy"
    path.write_bytes(b"\x93NUMPY" + bytes([version, 0]) + blob)
    assert S.scan_file(path).status in S.LEVELS


# -- the command ------------------------------------------------------------------------------

def test_cli_exit_codes_and_json(corpus, capsys):
    tmp, bad, good = corpus
    assert main(["scan", str(tmp / "good")]) == 0
    out = capsys.readouterr().out
    assert f"{len(good)} files: {len(good)} clean" in out
    assert main(["scan", str(bad["system_p4.pkl"]), str(good["state_dict.pt"]), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "dangerous"
    assert [f["status"] for f in result["files"]] == ["dangerous", "clean"]
    assert {"module": "posix", "name": "system"}.items() <= result["files"][0]["globals"][0].items()
    assert main(["scan", str(tmp / "bad")]) == 1
    assert "dangerous" in capsys.readouterr().out


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["scan"])
    assert exc.value.code == 2


def test_links_and_other_files_are_skipped(tmp_path, corpus):
    _, bad, _ = corpus
    (tmp_path / "notes.txt").write_text("hello, not a model\n")
    (tmp_path / "link.pkl").symlink_to(bad["system_p2.pkl"])
    reports = S.scan_paths([str(tmp_path)])
    assert {Path(r.path).name: r.status for r in reports} == {"notes.txt": "clean", "link.pkl": "clean"}
    assert {r.format for r in reports} == {"other", "symlink"}


def test_safetensors_starting_with_0x80_are_not_taken_for_pickles(tmp_path):
    # The first byte is the low byte of the header length: 0x80 for one length in 256.
    from safetensors.torch import save

    for pad in range(600):
        blob = save({"w": torch.arange(3.0)}, metadata={"pad": "x" * pad})
        if blob[0] == 0x80 and 2 <= blob[1] <= 5:
            break
    else:
        pytest.fail("no padding gave a header length that starts like PROTO 2-5")
    (tmp_path / "w.safetensors").write_bytes(blob)
    (tmp_path / "w.zip").write_bytes(torch_zip({"w.safetensors": blob}))
    (tmp_path / "cut.zip").write_bytes(torch_zip({"w.safetensors": blob[:-4]}))
    status = {Path(r.path).name: r.status for r in S.scan_paths([str(tmp_path)])}
    assert status == {"w.safetensors": "clean", "w.zip": "clean", "cut.zip": "unparseable"}
