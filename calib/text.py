"""Held-out English prose that ships with Python itself: the help topics in ``pydoc_data.topics``.

The text is cut once, at a topic boundary, into a calibration part (the first ~80% of topics, sorted by
name) and an evaluation part (the rest), so evaluation windows never overlap calibration windows.
"""

from __future__ import annotations

EVAL_FRACTION = 0.2


def python_docs(part: str) -> str:
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * (1 - EVAL_FRACTION))
    chosen = names[:cut] if part == "calibration" else names[cut:]
    return "\n\n".join(topics[n].strip() for n in chosen)


def token_windows(tokenizer, text: str, windows: int, length: int, spread: bool = False) -> list[list[int]]:
    """Up to ``windows`` non-overlapping windows of ``length`` tokens: consecutive from the start of the text,
    or (``spread``) evenly spaced over all of it, so they sample every part of the text, not its first topics."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(windows, len(ids) // length)
    if not spread or n == 0:
        return [ids[i * length:(i + 1) * length] for i in range(n)]
    step = len(ids) // n
    return [ids[i * step:i * step + length] for i in range(n)]
