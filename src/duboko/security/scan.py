"""Is a model file safe to load? Read it without loading it: `duboko scan PATH...`.

A pickle is a program for a small stack machine; `pickle.load` runs it, and the program may
import any global (`os.system`) and call it (REDUCE). This scanner never unpickles and never
imports: it walks the opcodes with `pickletools.genops` and simulates just enough of the stack
(constant strings, the memo, marks) to know which globals the program would import and which it
would call:

- GLOBAL / INST carry "module name" in their argument (protocols 0-3);
- STACK_GLOBAL (protocol 4+) takes module and name from the stack: the strings may come through
  the memo (BINPUT / LONG_BINPUT / MEMOIZE then BINGET / LONG_BINGET / GET) or DUP, all followed
  here; operands that are not constant strings are reported as an unresolvable import;
- EXT1/2/4 import through the copyreg extension registry, which a scanner cannot see: dangerous;
- REDUCE, NEWOBJ(_EX), OBJ, INST and BUILD are where the imported callables run; the report
  lists what each calls when it is a known global.

Containers, found by their bytes (never by the file name): raw pickles of every protocol (several
in a row too), legacy torch files (the pickles of the magic number, protocol, sys info, object and
storage keys, then raw storage bytes), torch zip checkpoints (every member whose name ends in
.pkl, and any other member whose bytes look like a pickle, whatever it is called; the numbered
storage records are data), legacy torch tar checkpoints (every member; pickles are also carved
out of the storage members), NumPy .npy (an object array's payload is a pickle) and .npz, nested
zips (to MAX_DEPTH), zips with a broken CRC (read anyway: loaders that skip the check would run
them; the CRC error is reported), gzip / bz2 / xz streams (joblib's .pkl.gz). safetensors files are checked for a well-formed header: length
bound, JSON, known dtypes, shapes × dtype sizes equal to the offsets, offsets in range, no
overlaps and no gaps, without reading the tensors.

Each imported global is `safe` (the small allow-list of names that rebuild tensors and plain
containers, TORCH_SAFE / NUMPY_SAFE / BUILTIN_SAFE), `dangerous` (a known-bad module or builtin,
or anything that cannot be checked) or `suspicious` (anything else). A file is as bad as its
worst finding; a file that cannot be parsed is `unparseable` (a loader may still read it).
Known bypasses of picklescan and modelscan handled here: STACK_GLOBAL with memoised strings,
renamed inner pickles of a torch zip, a broken CRC, several pickles in one file, dotted names
(protocol 4's qualified names reach `os` through any module: "serialization.os.system"), object
arrays inside .npy / .npz.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import pickletools
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from duboko.errors import DubokoError

# Severities, worst last (a file takes its worst finding's).
LEVELS = ("clean", "suspicious", "dangerous", "unparseable")
# Bounds: every size that a file controls is checked against one of these.
MAX_PICKLE_BYTES = 1 << 30  # one pickle read into memory
MAX_TOTAL_BYTES = 4 << 30  # all bytes decompressed while scanning one top-level file
MAX_DEPTH = 3  # zips inside zips
MAX_MEMBERS = 100_000  # members of one archive
MAX_OPCODES = 50_000_000  # opcodes of one pickle
MAX_STACK = 10_000_000  # simulated stack depth
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit (100 MB)
MAX_NPY_HEADER = 1 << 16
MAX_UNKNOWN_BYTES = 64 << 20  # a file of no known format and no model-file name: tried as a pickle up to this size
MAX_CARVE_TRIES = 10_000  # pickle starts tried inside one storage blob of a legacy tar

# torch.save's legacy (non-zip) format starts with this number, pickled (torch/serialization.py).
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PICKLES = 5  # magic, protocol version, sys info, the object, the storage keys

_STORAGES = ("Double", "Float", "Half", "Long", "Int", "Short", "Char", "Byte", "Bool", "BFloat16",
             "ComplexDouble", "ComplexFloat", "QUInt8", "QInt8", "QInt32", "QUInt4x2", "QUInt2x4")
_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64", "complex128", "double", "float", "half", "long", "int", "short", "uint16", "uint32",
           "uint64", "float8_e4m3fn", "float8_e5m2", "qint8", "quint8", "qint32", "cfloat", "cdouble")
# The names torch.save / numpy / plain Python need to rebuild tensors, arrays and containers.
TORCH_SAFE = frozenset(
    {("torch._utils", n) for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                                   "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                                   "_rebuild_meta_tensor_no_storage", "_rebuild_device_tensor_from_numpy",
                                   "_rebuild_nested_tensor")}
    | {("torch", f"{s}Storage") for s in _STORAGES}
    | {("torch", d) for d in _DTYPES}
    | {("torch", "Size"), ("torch", "device"), ("torch", "strided"), ("torch", "sparse_coo"),
       ("torch", "contiguous_format"), ("torch", "channels_last"), ("torch", "preserve_format"),
       ("torch", "per_tensor_affine"), ("torch", "per_channel_affine"), ("torch.storage", "UntypedStorage"),
       ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"), ("torch", "Tensor"),
       ("torch.nn.parameter", "Parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
       ("torch.serialization", "_get_layout")}
)
NUMPY_SAFE = frozenset(
    {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
    | {("numpy", d) for d in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool_")}
    | {("numpy.dtypes", f"{d}DType") for d in ("Float64", "Float32", "Float16", "Int64", "Int32", "Int16", "Int8",
                                                "UInt8", "Bool")}
)
BUILTIN_SAFE = frozenset(
    {("collections", "OrderedDict"), ("_codecs", "encode"),  # protocol ≤ 2 bytes
     ("copyreg", "_reconstructor"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
     ("builtins", "slice"), ("builtins", "bytearray"), ("builtins", "object"), ("__builtin__", "set"),
     ("builtins", "int"), ("builtins", "float"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "tuple"),
     ("builtins", "list"), ("builtins", "dict"), ("builtins", "bool"), ("builtins", "range")}
)
SAFE_GLOBALS = TORCH_SAFE | NUMPY_SAFE | BUILTIN_SAFE

# Modules whose every name is dangerous to import from a pickle (prefix match: os.path too).
DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "runpy", "pip", "shutil", "sys", "socket", "pty",
    "commands", "webbrowser", "ctypes", "code", "codeop", "pdb", "bdb", "timeit", "pickle", "_pickle", "cPickle",
    "dill", "cloudpickle", "marshal", "importlib", "imp", "pkgutil", "zipimport", "multiprocessing", "asyncio",
    "threading", "_thread", "signal", "platform", "requests", "urllib", "urllib2", "httplib", "http", "ftplib",
    "telnetlib", "smtplib", "tempfile", "glob", "io", "_io", "types", "inspect", "gc",
    "operator", "functools", "ssl", "select", "selectors", "sqlite3", "xmlrpc", "torch.hub", "torch.jit",
    "torch.serialization", "torch.storage._load_from_bytes", "numpy.load", "numpy.lib.npyio", "joblib", "yaml",
    "setuptools", "distutils", "venv", "ensurepip", "site", "sysconfig", "linecache", "trace", "profile",
    "cProfile", "uuid", "shelve", "dbm", "logging.config", "keras", "tensorflow", "_posixsubprocess",
    "posix_spawn", "_winapi", "winreg", "msvcrt",
})
# Builtins that evaluate code, reach attributes, or touch files/modules.
DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "getattr", "setattr", "delattr", "__import__", "open", "globals", "locals", "vars",
    "breakpoint", "input", "memoryview", "help", "exit", "quit", "super", "type", "classmethod", "staticmethod",
    "property", "print", "dir", "apply", "execfile", "reload", "file", "__build_class__", "hasattr", "iter", "next",
    "map", "filter",
})
# torch names that are not in the allow-list but are never needed by a checkpoint and are gadgets.
DANGEROUS_NAMES = frozenset({("torch", "load"), ("torch", "save"), ("torch.storage", "_load_from_bytes"),
                             ("torch._utils", "_rebuild_from_type"), ("numpy", "load"), ("numpy", "loadtxt"),
                             ("numpy", "fromfile"), ("numpy.testing._private.utils", "runstring")})

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".dat", ".data", ".model", ".mar", ".tar")
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})
_MARK = object()  # the simulated stack's mark
_STORAGE_RECORD = re.compile(r"(^|/)data/\d+$")  # a torch zip's raw storage bytes (never unpickled)


def classify(module: str, name: str) -> str:
    """safe | dangerous | suspicious for one imported global."""
    if (module, name) in SAFE_GLOBALS:
        return "safe"
    if (module, name) in DANGEROUS_NAMES:
        return "dangerous"
    root = module.split(".")[0]
    if module in ("builtins", "__builtin__", "__builtins__"):
        return "dangerous" if name.split(".")[0] in DANGEROUS_BUILTINS or "." in name else "suspicious"
    for bad in DANGEROUS_MODULES:
        if module == bad or module.startswith(bad + ".") or f"{module}.{name}" == bad:
            return "dangerous"
    if root in ("os", "posix", "nt", "subprocess", "builtins"):
        return "dangerous"
    # Protocol 4's qualified names walk attributes (pickle's _getattribute): "serialization.os.system"
    # reaches os through any module; a dunder reaches anything (__globals__, __builtins__).
    parts = name.split(".")
    if len(parts) > 1 or any(p.startswith("__") and p.endswith("__") for p in parts):
        return "dangerous"
    if not module or not name:
        return "dangerous"
    return "suspicious"


@dataclass
class Finding:
    where: str  # file, with "!member" for each archive level
    level: str  # suspicious | dangerous | unparseable
    what: str  # one line: the global, or what is wrong


@dataclass
class GlobalRef:
    where: str
    module: str
    name: str
    level: str  # safe | suspicious | dangerous
    opcode: str  # GLOBAL | STACK_GLOBAL | INST | EXT
    called: bool = False  # REDUCE / NEWOBJ / OBJ / INST / BUILD-ed with it


@dataclass
class FileReport:
    path: str
    format: str = "unknown"  # pickle | torch-legacy | torch-zip | torch-tar | zip | npy | npz | safetensors | ...
    status: str = "clean"  # clean | suspicious | dangerous | unparseable (the worst finding)
    globals: list[GlobalRef] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    pickles: int = 0  # pickles read
    notes: list[str] = field(default_factory=list)

    def add(self, where: str, level: str, what: str) -> None:
        self.findings.append(Finding(where, level, what))
        if LEVELS.index(level) > LEVELS.index(self.status):
            self.status = level

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Budget:
    """Bytes decompressed while scanning one top-level file (zip bombs, nested archives)."""

    def __init__(self, limit: int = MAX_TOTAL_BYTES):
        self.left = limit

    def take(self, n: int) -> bool:
        self.left -= n
        return self.left >= 0


class PickleError(Exception):
    """The opcodes do not form a pickle this scanner can follow."""


# -- the opcode walk ---------------------------------------------------------------------------

@dataclass
class _Global:
    module: str
    name: str
    ref: GlobalRef | None = None


def scan_pickle_stream(stream: io.BufferedIOBase, where: str, report: FileReport) -> Any:
    """Walk one pickle (to its STOP) from `stream`, recording its globals into `report`.
    Returns the value of a constant top-level int (the legacy torch magic), else None.
    Raises PickleError when the opcodes are malformed."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    n_ops = 0
    result = None
    calls = 0

    def record(module: Any, name: Any, opcode: str) -> _Global:
        if not (isinstance(module, str) and isinstance(name, str)):
            report.add(where, "dangerous", f"{opcode} with operands that are not constant strings "
                       f"({type(module).__name__}, {type(name).__name__}): an import this scanner cannot resolve")
            return _Global("?", "?")
        ref = GlobalRef(where, module, name, classify(module, name), opcode)
        report.globals.append(ref)
        if ref.level != "safe":
            report.add(where, ref.level, f"imports {module}.{name} ({opcode})")
        return _Global(module, name, ref)

    def pop() -> Any:
        if not stack:
            raise PickleError("stack underflow")
        return stack.pop()

    def pop_mark() -> list[Any]:
        items = []
        while True:
            if not stack:
                raise PickleError("no MARK on the stack")
            item = stack.pop()
            if item is _MARK:
                return items[::-1]
            items.append(item)

    def called(fn: Any, opcode: str) -> None:
        nonlocal calls
        calls += 1
        if isinstance(fn, _Global) and fn.ref is not None:
            fn.ref.called = True
            if fn.ref.level != "safe":
                report.add(where, fn.ref.level, f"calls {fn.module}.{fn.name} ({opcode})")

    try:
        for op, arg, _pos in pickletools.genops(stream):
            n_ops += 1
            if n_ops > MAX_OPCODES or len(stack) > MAX_STACK:
                raise PickleError(f"more than {MAX_OPCODES} opcodes or a stack deeper than {MAX_STACK}")
            name = op.name
            if name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else str(arg))
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                stack.append(arg)
            elif name == "MARK":
                stack.append(_MARK)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not stack:
                    raise PickleError(f"{name} on an empty stack")
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                if not stack:
                    raise PickleError("MEMOIZE on an empty stack")
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in memo:
                    raise PickleError(f"{name} {arg} reads a memo slot never written")
                stack.append(memo[int(arg)])
            elif name == "DUP":
                if not stack:
                    raise PickleError("DUP on an empty stack")
                stack.append(stack[-1])
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(record(module, attr, "GLOBAL"))
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                stack.append(record(module, attr, "STACK_GLOBAL"))
            elif name == "INST":
                module, _, attr = str(arg).partition(" ")
                g = record(module, attr, "INST")
                pop_mark()
                called(g, "INST")
                stack.append(None)
            elif name in ("EXT1", "EXT2", "EXT4"):
                report.add(where, "dangerous", f"{name} {arg}: imports through the copyreg extension registry, "
                           "which a scanner cannot see")
                stack.append(_Global("copyreg-extension", str(arg)))
            elif name == "REDUCE":
                pop()
                called(pop(), "REDUCE")
                stack.append(None)
            elif name == "NEWOBJ":
                pop()
                called(pop(), "NEWOBJ")
                stack.append(None)
            elif name == "NEWOBJ_EX":
                pop(), pop()
                called(pop(), "NEWOBJ_EX")
                stack.append(None)
            elif name == "OBJ":
                items = pop_mark()
                if not items:
                    raise PickleError("OBJ without a class")
                called(items[0], "OBJ")
                stack.append(None)
            elif name == "BUILD":
                pop()
                obj = pop()
                calls += 1
                if isinstance(obj, _Global):
                    # BUILD on an imported function or class sets its attributes (modelscan issue 85)
                    report.add(where, "dangerous", f"BUILD sets attributes on the imported global {obj.module}.{obj.name}")
                stack.append(obj)
            elif name == "STOP":
                top = pop()
                result = top if isinstance(top, int) and not isinstance(top, bool) else None
                break
            else:
                # Every other opcode by its documented stack effect (pickletools' stack_before / after).
                before = [s.name for s in op.stack_before]
                if "mark" in before:
                    pop_mark()
                    for _ in range(before.index("mark")):
                        pop()
                else:
                    for _ in before:
                        pop()
                stack.extend(None for _ in op.stack_after)
        else:
            raise PickleError("no STOP opcode")
    except PickleError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, MemoryError, EOFError,
            UnicodeDecodeError, struct.error) as exc:
        raise PickleError(f"{type(exc).__name__}: {_short(exc)}") from exc
    report.pickles += 1
    return result


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def scan_pickle_bytes(data: bytes, where: str, report: FileReport, *, strict: bool = True) -> None:
    """Every pickle in `data`, one after the other (torch's legacy files and others hold several:
    each `pickle.load` of the same file reads the next)."""
    stream = io.BytesIO(data)
    first = True
    count = 0
    legacy = False
    while stream.tell() < len(data):
        start = stream.tell()
        try:
            value = scan_pickle_stream(stream, where if first else f"{where}@{start}", report)
        except PickleError as exc:
            if first:
                if strict:
                    report.add(where, "unparseable", f"not a readable pickle: {exc}")
                raise
            # Trailing bytes that are not a pickle: nothing loads them as one unless a loader
            # reads raw data there (torch legacy storages, handled below).
            report.add(where, "suspicious", f"{len(data) - start} bytes after the pickle(s) are not a pickle ({exc})")
            return
        count += 1
        if first and value == TORCH_LEGACY_MAGIC:
            legacy = True
            report.format = "torch-legacy" if report.format in ("unknown", "pickle") else report.format
        first = False
        if legacy and count == TORCH_LEGACY_PICKLES:
            rest = len(data) - stream.tell()
            if rest:
                report.notes.append(f"{where}: {rest} bytes of raw storage data after the {count} pickles (not a pickle)")
            return


# -- containers --------------------------------------------------------------------------------

def _looks_like_pickle(head: bytes) -> bool:
    """PROTO 2-5 (what every pickler since Python 2.3 writes first)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, report: FileReport, budget: _Budget,
                 limit: int = MAX_PICKLE_BYTES) -> bytes | None:
    """A zip member's bytes, bounded; a bad CRC is reported (unparseable) and the bytes are
    kept: loaders that do not check it (torch's) would read them."""
    if info.file_size > limit:
        report.add(where, "unparseable", f"member of {info.file_size} bytes is over the {limit}-byte bound; not scanned")
        return None
    if not budget.take(info.file_size):
        report.add(where, "unparseable", f"the scan's {MAX_TOTAL_BYTES}-byte decompression bound is spent; not scanned")
        return None
    try:
        with zf.open(info) as fh:
            fh._expected_crc = None  # read it all, then compare the CRC ourselves
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
        report.add(where, "unparseable", f"cannot decompress: {_short(exc)}")
        return None
    if len(data) > limit:
        report.add(where, "unparseable", f"member decompresses to more than {limit} bytes; not scanned")
        return None
    if zlib.crc32(data) & 0xFFFFFFFF != info.CRC:
        report.add(where, "unparseable", f"bad CRC-32 (stored {info.CRC:08x}, data {zlib.crc32(data) & 0xFFFFFFFF:08x}): "
                   "the archive was altered; its contents were scanned anyway")
    return data


def scan_zip(source: Any, where: str, report: FileReport, budget: _Budget, depth: int) -> None:
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        report.add(where, "unparseable", f"not a readable zip: {_short(exc)}")
        return
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            report.add(where, "unparseable", f"{len(infos)} members, over the {MAX_MEMBERS} bound")
            infos = infos[:MAX_MEMBERS]
        names = [i.filename for i in infos]
        is_torch = any(n.endswith("data.pkl") for n in names)
        is_npz = bool(names) and all(n.endswith(".npy") for n in names)
        if report.format == "unknown" and depth == 0:
            report.format = "torch-zip" if is_torch else "npz" if is_npz else "zip"
        for info in infos:
            if info.is_dir():
                continue
            member = f"{where}!{info.filename}"
            if _STORAGE_RECORD.search(info.filename) and info.filename.count("/") <= 2 and is_torch:
                continue  # raw tensor bytes: torch reads them as data, never as a pickle
            head = _peek_member(zf, info)
            lower = info.filename.lower()
            if lower.endswith((".pkl", ".pickle")):
                data = _read_member(zf, info, member, report, budget)
                if data is not None:
                    _try_pickle(data, member, report, strict=True)
            elif head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                if depth + 1 > MAX_DEPTH:
                    report.add(member, "unparseable", f"zip nested deeper than {MAX_DEPTH} levels; not scanned")
                    continue
                data = _read_member(zf, info, member, report, budget)
                if data is not None:
                    scan_zip(io.BytesIO(data), member, report, budget, depth + 1)
            elif head[:6] == b"\x93NUMPY":
                data = _read_member(zf, info, member, report, budget)
                if data is not None:
                    scan_npy(data, member, report)
            elif _looks_like_safetensors(head, info.file_size):
                # checked before the pickle sniff: a header length of 128 mod 256 starts with 0x80
                data = _read_member(zf, info, member, report, budget)
                if data is not None:
                    n = struct.unpack("<Q", data[:8])[0]
                    for problem in safetensors_problems(data[8 : 8 + n], len(data) - 8 - n):
                        report.add(member, "unparseable", problem)
            elif _looks_like_pickle(head):
                # Whatever its name: torch finds its pickle by the archive's record names, and
                # other loaders take any member; a renamed pickle is still a pickle.
                data = _read_member(zf, info, member, report, budget)
                if data is not None:
                    _try_pickle(data, member, report, strict=True)


def _peek_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with zf.open(info) as fh:
            fh._expected_crc = None
            return fh.read(16)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError, ValueError):
        return b""


def _try_pickle(data: bytes, where: str, report: FileReport, strict: bool) -> None:
    try:
        scan_pickle_bytes(data, where, report, strict=strict)
    except PickleError:
        pass  # reported by scan_pickle_bytes when strict


def scan_tar(path: Path, where: str, report: FileReport, budget: _Budget) -> None:
    """torch's legacy tar checkpoints (members sys_info, pickle, storages, tensors) and any
    tar: each member is scanned as a pickle; the storage members hold pickles between raw
    bytes, so every pickle start in them is tried (carving)."""
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        report.add(where, "unparseable", f"not a readable tar: {_short(exc)}")
        return
    with tf:
        names = []
        count = 0
        for member in tf:
            count += 1
            if count > MAX_MEMBERS:
                report.add(where, "unparseable", f"more than {MAX_MEMBERS} members")
                break
            if not member.isfile():
                continue
            names.append(member.name)
            inner = f"{where}!{member.name}"
            if member.size > MAX_PICKLE_BYTES or not budget.take(member.size):
                report.add(inner, "unparseable", f"member of {member.size} bytes is over the scan's bounds; not scanned")
                continue
            fh = tf.extractfile(member)
            if fh is None:
                continue
            data = fh.read()
            base = member.name.rsplit("/", 1)[-1]
            if base in ("storages", "tensors"):
                _carve_pickles(data, inner, report)
            elif data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                scan_zip(io.BytesIO(data), inner, report, budget, 1)
            else:
                _try_pickle(data, inner, report, strict=True)
        if report.format == "unknown":
            report.format = "torch-tar" if {"pickle", "storages"} <= {n.rsplit("/", 1)[-1] for n in names} else "tar"


def _carve_pickles(data: bytes, where: str, report: FileReport) -> None:
    """Every pickle that starts at a PROTO opcode inside raw data (the header pickles of a
    legacy storage blob sit between the tensors' bytes). Only complete pickles count: random
    bytes rarely form one, and those that do are still worth a look."""
    start, tries = 0, 0
    while tries < MAX_CARVE_TRIES:
        pos = data.find(b"\x80", start)
        if pos < 0:
            break
        start = pos + 1
        if not _looks_like_pickle(data[pos : pos + 2]):
            continue
        tries += 1
        trial = FileReport(report.path)
        try:
            scan_pickle_stream(io.BytesIO(data[pos:]), f"{where}@{pos}", trial)
        except PickleError:
            continue
        report.pickles += trial.pickles
        report.globals.extend(trial.globals)
        for f in trial.findings:
            report.add(f.where, f.level, f.what)
    if tries >= MAX_CARVE_TRIES:
        report.add(where, "suspicious", f"more than {MAX_CARVE_TRIES} pickle starts; the rest was not carved")


def scan_npy(data: bytes, where: str, report: FileReport, size: int | None = None, path: Path | None = None) -> None:
    """A .npy: magic, version, header (a Python dict literal, read with ast.literal_eval, which
    evaluates no code); an object dtype means the payload is a pickle. `data` is the whole file,
    or (with `path` and `size`) only its head: the payload is then read only when it is a pickle."""
    import numpy as np

    if report.format == "unknown":
        report.format = "npy"
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        report.add(where, "unparseable", "not a .npy file (no \\x93NUMPY magic)")
        return
    major = data[6]
    if major == 1:
        hlen, off = struct.unpack("<H", data[8:10])[0], 10
    elif major in (2, 3) and len(data) >= 12:
        hlen, off = struct.unpack("<I", data[8:12])[0], 12
    else:
        report.add(where, "unparseable", f".npy version {major} is unknown")
        return
    if hlen > MAX_NPY_HEADER or off + hlen > len(data):
        report.add(where, "unparseable", f".npy header of {hlen} bytes is over {MAX_NPY_HEADER} or past the end")
        return
    try:
        header = ast.literal_eval(data[off : off + hlen].decode("utf-8" if major == 3 else "latin1"))
        if not isinstance(header, dict) or not {"descr", "fortran_order", "shape"} <= set(header):
            raise ValueError("header is not a dict with descr, fortran_order and shape")
        dtype = np.lib.format.descr_to_dtype(header["descr"])
        shape = header["shape"]
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"shape {shape!r} is not a tuple of sizes")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError) as exc:
        report.add(where, "unparseable", f".npy header is not readable: {_short(exc)}")
        return
    if path is not None:
        if dtype.hasobject:
            if size > MAX_PICKLE_BYTES:
                report.add(where, "unparseable", f"object array of {size} bytes is over the {MAX_PICKLE_BYTES}-byte bound")
                return
            data = path.read_bytes()
    payload = data[off + hlen :]
    payload_size = len(payload) if path is None or dtype.hasobject else size - off - hlen
    if dtype.hasobject:
        report.notes.append(f"{where}: object array (dtype {dtype}); its payload is a pickle")
        report.add(where, "suspicious", f"object array (dtype {dtype}): numpy.load(allow_pickle=True) unpickles it")
        _try_pickle(payload, where, report, strict=True)
        return
    expected = math.prod(shape) * dtype.itemsize
    if payload_size < expected:
        report.add(where, "unparseable", f".npy data is {payload_size} bytes, the header needs {expected}")


# safetensors dtype -> bytes per element
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8, "C128": 16}


def scan_safetensors(path: Path, where: str, report: FileReport) -> None:
    """The header only: 8-byte little-endian length N (≤ 100 MB), N bytes of JSON (one object,
    no duplicate keys), and for each tensor a known dtype, a shape of sizes, data_offsets
    [begin, end] with end − begin = prod(shape) × size, in range; together the tensors tile the
    data section exactly (sorted, no overlap, no gap)."""
    report.format = "safetensors"
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            report.add(where, "unparseable", "shorter than the 8-byte header length")
            return
        n = struct.unpack("<Q", head)[0]
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            report.add(where, "unparseable", f"header length {n} is over {MAX_SAFETENSORS_HEADER} or past the end of the {size}-byte file")
            return
        raw = fh.read(n)
    problems = safetensors_problems(raw, size - 8 - n)
    for p in problems:
        report.add(where, "unparseable", p)


def safetensors_problems(raw: bytes, data_size: int) -> list[str]:
    """What is wrong with a safetensors header (its JSON bytes) over `data_size` bytes of data."""

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"duplicate key {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except RecursionError:
        return ["header JSON is nested too deeply"]
    except (UnicodeDecodeError, ValueError) as exc:
        return [f"header is not JSON: {_short(exc)}"]
    if not isinstance(header, dict):
        return [f"header is a JSON {type(header).__name__}, not an object"]
    problems: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                problems.append("__metadata__ is not a map of strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            problems.append(f"tensor {key!r}: entry is not {{dtype, shape, data_offsets}}")
            continue
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            problems.append(f"tensor {key!r}: unknown dtype {dtype!r}")
            continue
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            problems.append(f"tensor {key!r}: shape {shape!r} is not a list of sizes")
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            problems.append(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end]")
            continue
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            problems.append(f"tensor {key!r}: data_offsets [{begin}, {end}] outside the {data_size}-byte data section")
            continue
        need = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - begin != need:
            problems.append(f"tensor {key!r}: {end - begin} bytes for shape {shape} of {dtype} ({need} bytes)")
            continue
        spans.append((begin, end, key))
    if problems:
        return problems
    at = 0
    for begin, end, key in sorted(spans):
        if begin < at:
            problems.append(f"tensor {key!r} overlaps the previous tensor (begins at {begin} < {at})")
        elif begin > at:
            problems.append(f"gap of {begin - at} bytes before tensor {key!r}")
        at = max(at, end)
    if at != data_size and not problems:
        problems.append(f"{data_size - at} bytes after the last tensor are not covered by the header")
    return problems


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 0 < n <= size - 8 and head[8:9] == b"{"


# -- files and folders -------------------------------------------------------------------------

def scan_file(path: str | Path) -> FileReport:
    """Scan one file (never loading or importing what it holds)."""
    path = Path(path)
    where = str(path)
    report = FileReport(where)
    try:
        st = path.lstat()
    except OSError as exc:
        report.add(where, "unparseable", f"cannot read: {exc.strerror or exc}")
        return report
    if stat.S_ISLNK(st.st_mode):
        report.format = "symlink"
        report.notes.append(f"{where}: a symbolic link; not followed (scan its target)")
        return report
    if not stat.S_ISREG(st.st_mode):
        report.add(where, "unparseable", "not a regular file")
        return report
    budget = _Budget()
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or (zipfile.is_zipfile(path) and not _looks_like_pickle(head)):
            scan_zip(path, where, report, budget, 0)
        elif head[:6] == b"\x93NUMPY":
            with open(path, "rb") as fh:
                scan_npy(fh.read(12 + MAX_NPY_HEADER), where, report, size=st.st_size, path=path)
        elif len(head) >= 262 and head[257:262] == b"ustar" or _is_tar(path, head):
            scan_tar(path, where, report, budget)
        elif head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
            scan_compressed(path, head, where, report, budget)
        elif _looks_like_safetensors(head, st.st_size) or path.suffix.lower() == ".safetensors":
            scan_safetensors(path, where, report)
        elif st.st_size == 0:
            report.format = "empty"
        else:
            if st.st_size > MAX_PICKLE_BYTES:
                report.add(where, "unparseable", f"{st.st_size} bytes of unknown format is over the {MAX_PICKLE_BYTES}-byte bound")
                return report
            known = path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(head[:2])
            if not known and st.st_size > MAX_UNKNOWN_BYTES:
                # No model-file name and no PROTO opcode: a large document or video is not read.
                report.format = "other"
                report.notes.append(f"{where}: {st.st_size} bytes, not a model file by name or magic; skipped")
                return report
            data = path.read_bytes()
            trial = FileReport(where)
            try:
                scan_pickle_bytes(data, where, trial, strict=True)
            except PickleError:
                if known:
                    report.format = "pickle"
                    for f in trial.findings:
                        report.add(f.where, f.level, f.what)
                    report.globals = trial.globals
                else:
                    # Not a model file by name, and its bytes are no pickle: nothing a loader would run.
                    report.format = "other"
                    report.notes.append(f"{where}: not a pickle, zip, tar, .npy or safetensors file; skipped")
                return report
            if report.format == "unknown":
                report.format = trial.format if trial.format != "unknown" else "pickle"
            report.globals, report.pickles, report.notes = trial.globals, trial.pickles, trial.notes
            for f in trial.findings:
                report.add(f.where, f.level, f.what)
    except OSError as exc:
        report.add(where, "unparseable", f"cannot read: {exc.strerror or exc}")
    except RecursionError:
        report.add(where, "unparseable", "nested too deeply to scan")
    return report


def scan_compressed(path: Path, head: bytes, where: str, report: FileReport, budget: _Budget) -> None:
    """gzip / bz2 / xz files (joblib's .pkl.gz, compressed tars): decompressed in a stream,
    bounded, then scanned by their content."""
    import bz2
    import gzip
    import lzma

    opener, kind = ((gzip.open, "gzip") if head[:2] == b"\x1f\x8b" else (bz2.open, "bz2") if head[:3] == b"BZh"
                    else (lzma.open, "xz"))
    try:
        with opener(path, "rb") as fh:
            data = fh.read(MAX_PICKLE_BYTES + 1)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        report.add(where, "unparseable", f"{kind} stream is not readable: {_short(exc)}")
        return
    if len(data) > MAX_PICKLE_BYTES or not budget.take(len(data)):
        report.add(where, "unparseable", f"{kind} stream decompresses to more than {MAX_PICKLE_BYTES} bytes; not scanned")
        return
    inner = f"{where}!{kind}"
    report.format = f"{kind}"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        scan_zip(io.BytesIO(data), inner, report, budget, 1)
    elif data[:6] == b"\x93NUMPY":
        scan_npy(data, inner, report)
    elif len(data) >= 262 and data[257:262] == b"ustar":
        report.notes.append(f"{where}: a compressed tar; scan it after decompressing")
        report.add(inner, "suspicious", "compressed tar archive: not scanned inside")
    else:
        report.format = f"pickle+{kind}"
        _try_pickle(data, inner, report, strict=True)


def _is_tar(path: Path, head: bytes) -> bool:
    if len(head) < 512:
        return False
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError, ValueError):
        return False


def iter_files(paths: list[str]) -> Iterator[Path]:
    """The files named, and every file under the folders named (sorted; links not followed)."""
    for p in paths:
        path = Path(p)
        if path.is_dir() and not path.is_symlink():
            for root, dirs, files in os.walk(path, followlinks=False):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif path.exists() or path.is_symlink():
            yield path
        else:
            raise DubokoError(f"{p!r} does not exist")


def scan_paths(paths: list[str]) -> list[FileReport]:
    if not paths:
        raise DubokoError("name at least one file or folder to scan")
    return [scan_file(p) for p in iter_files(paths)]


def worst(reports: list[FileReport]) -> str:
    return max((r.status for r in reports), key=LEVELS.index, default="clean")


def exit_code(reports: list[FileReport]) -> int:
    """1 when anything is dangerous or unparseable, else 0 (suspicious alone: 0, shown)."""
    return 1 if any(r.status in ("dangerous", "unparseable") for r in reports) else 0


def format_table(reports: list[FileReport], verbose: bool = False) -> str:
    lines = [f"{'status':<12} {'format':<13} {'pickles':>7} {'globals':>7}  file"]
    skipped = 0
    for r in reports:
        if r.format in ("other", "symlink", "empty") and r.status == "clean" and not verbose:
            skipped += 1  # not a model file: counted, listed with --verbose
            continue
        lines.append(f"{r.status:<12} {r.format:<13} {r.pickles:>7} {len(r.globals):>7}  {r.path}")
        seen = set()
        for g in r.globals:
            if g.level == "safe" and not verbose:
                continue
            key = (g.where, g.module, g.name)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"    {g.level:<10} {g.module}.{g.name}  ({g.opcode}{', called' if g.called else ''}) in {g.where}")
        for f in r.findings:
            if f.what.startswith(("imports ", "calls ")):
                continue  # shown as globals above
            lines.append(f"    {f.level:<10} {f.what}  in {f.where}")
        if verbose:
            lines.extend(f"    note       {n}" for n in r.notes)
    counts = {level: sum(r.status == level for r in reports) for level in LEVELS}
    lines.append(f"{len(reports)} files: " + ", ".join(f"{n} {level}" for level, n in counts.items())
                 + (f" ({skipped} not model files, skipped: --verbose lists them)" if skipped else ""))
    return "\n".join(lines)
