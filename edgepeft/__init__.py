"""edgepeft: QLoRA-style fine-tuning of small language models, shipped to phones and laptops."""

__version__ = "0.1.0"
