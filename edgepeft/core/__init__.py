"""What every other folder uses and nothing heavy: the user-facing error (``errors``), typed TOML tables
(``config``), console output (``console``: progress bars, quiet third-party logging), file hashing and atomic
writes (``files``), and the static import graph of the package (``imports``: what the code-version part of a
stage's fingerprint and the layering test are computed from), handing freed heap back to the system
(``memory``). Nothing here imports PyTorch or ONNX Runtime,
and nothing here imports another folder of edgepeft.
"""
