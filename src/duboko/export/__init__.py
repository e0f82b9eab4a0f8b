"""Models out of duboko and in: ONNX export checked against PyTorch (`onnx.py`), int8 dynamic
quantisation of an exported file (`quantize.py`), and Hugging Face GPT-2 weights as a run folder
(`hf_gpt2.py`).

The ONNX side needs the optional `[export]` extra (onnx, onnxscript, onnxruntime); every entry
point says so in one line when it is missing.
"""
