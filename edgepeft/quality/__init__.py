"""Whether a model still computes what was trained: the figures (``scores``: perplexity, KL, next-token
agreement, budgets and verdicts), the PyTorch reference (4-bit base + adapter) and PyTorch logits
(``reference``), task accuracy by exact match (``answers``), and the quality gate that judges a bundle and
writes its verdict into it (``gate``).
"""
