"""Console helpers that import nothing heavy (the profiler and the latency gate run without PyTorch)."""

from __future__ import annotations

import sys


def progress(total: int, desc: str, unit: str, **kwargs):
    """A tqdm bar for a long stage: lively on a terminal, one line every 30 s in a CI log."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, mininterval=2 if sys.stderr.isatty() else 30,
                dynamic_ncols=True, **kwargs)


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"
