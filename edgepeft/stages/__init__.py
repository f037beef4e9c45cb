"""The pipeline's stages, one module each: ``run(ctx)`` and, beside it, ``STAGE``, the declaration of what it
reads (recipe tables, earlier stages' artifacts, outside files; see ``edgepeft.pipeline.stage``). Stages use
the library (every other folder) and never each other; only ``registry`` (their order) and the CLI import
them. A stage module imports nothing heavy at its top (no PyTorch, transformers or ONNX Runtime): those are
imported inside ``run``, so the CLI starts fast.
"""
