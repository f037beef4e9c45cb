"""Running a bundle on the official aarch64 build of ONNX Runtime under user-mode emulation (qemu) and
comparing its logits with the x86 run: ``probe`` is the standalone script run on both sides, ``emulate``
builds the arm64 Debian root, runs both and compares."""
