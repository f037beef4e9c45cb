"""Speed: the latency profile written into every bundle (``profile``), the cost model of decode and its
physical floor (``costmodel``), the CI regression gate against a committed baseline (``check``), how often
that gate false-alarms or detects on a machine (``study``), and the benchmarks against the tools users would
pick instead (``bench``: inference against onnxruntime-genai's builder; ``bench_train``: the train stage against
the standard QLoRA recipe). The timing loops themselves are ``edgepeft.onnx.decoder.timed_generation``.
"""
