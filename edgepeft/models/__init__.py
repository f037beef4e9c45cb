"""The base model on the PyTorch side: where it comes from (``sources``: a local folder, the HF cache, a GGUF
file or a built-in name, safetensors/GGUF only, no remote code) and the PyTorch helpers the training-side
stages share (``pytorch``: device, memory, loading the NF4 base, its exact dequantized copy).
"""
