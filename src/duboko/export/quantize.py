"""int8 dynamic quantisation of an exported ONNX graph (ONNX Runtime's quantiser).

Dynamic quantisation (Jacob et al. 2018; ONNX Runtime `quantize_dynamic`): the weights of MatMul /
Gemm / LSTM / GRU nodes are stored as int8 with one scale per tensor, and each activation is
quantised on the fly with a scale taken from its own range, so no calibration data is needed.
Convolutions stay fp32 (ORT's dynamic ConvInteger kernel is slower than its fp32 one on CPU). The
accuracy cost is measured (`duboko bench inference`, the top-1 agreement of `export`), never
assumed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from duboko.errors import DubokoError

# The node types whose weights become int8 (the Linear and recurrent layers).
QUANTIZED_OPS = ["MatMul", "Gemm", "LSTM", "GRU", "Attention"]


def quantize_int8_bytes(model_bytes: bytes) -> bytes:
    """The int8 graph of an fp32 ONNX graph, both as serialized bytes."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise DubokoError("int8 quantisation needs onnxruntime: pip install 'duboko[export]'") from None
    # The quantiser reads and writes files: a private temporary folder, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="duboko-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS)
        except Exception as exc:  # the quantiser raises many types; one line for the user
            raise DubokoError(f"int8 quantisation failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        return dst.read_bytes()
