"""ONNX and ONNX Runtime work on exported decoders: the exporter (``builder``), running a decoder graph with
its KV cache (``decoder``), block quantization packed as ``MatMulNBits`` reads it (``quant``), choosing which
MatMuls stay at int8 (``mixed``), graph rewrites (``rewrite``: the tied, quantized embedding) and ONNX
Runtime's mobile format (``ortformat``). Nothing here imports PyTorch.
"""
